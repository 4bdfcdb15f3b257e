"""Users, events and labels of one chunk of synthetic users, as numpy arrays.

Used by :mod:`tokenizer.synthetic.generator`, which turns them into Parquet.  Every function takes the
chunk's random generator and draws from it in a fixed order, so a chunk is a pure function of
(world, seed, chunk index).  Events are built grouped by user and in time order (per-user
purchase days and sessions are sorted before they are expanded into events), so the final
(user, time) sort is nearly a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tokenizer.synthetic.world import DEVICES, N_REGIONS, World, pick, sample_rows, sigmoid

DAY = 86400

# Behaviour constants that shape realism but need no knob.
EXTRA_PURCHASES_PER_DAY = 0.35  # purchases on an active day = 1 + Poisson(this)
MEAN_POINT_USE_RATE = 1.0 / 3.5  # mean of the per-user Beta(1, 2.5) point-use probability
P_FAVOURITE = 0.25  # a purchase is one of the user's favourite (genre, shop) pairs
P_FAVOURITE_BROWSE = 0.12  # ... a page view
P_FAVOURITE_FUTURE = 0.35  # ... a purchase after the window (repeat buying)
P_EXPLORE = 0.08  # a draw comes from global popularity instead of the user's topics
P_REPEAT_IN_SESSION = 0.45  # a browsing event looks at the same item as the previous one


@dataclass
class Knobs:
    """The per-run parameters that shape events (see :func:`tokenizer.synthetic.generator.generate`)."""

    window_days: int
    short_days: int
    future_days: int
    long_events_per_user: float
    short_events_per_user: float
    session_length: float
    topics_per_user: int
    topic_concentration: float
    activity_sigma: float
    parent_label_fraction: float

    @property
    def days_per_user(self) -> float:
        """Mean active purchase days giving long_events_per_user (purchases + point uses)."""
        return self.long_events_per_user / (1 + EXTRA_PURCHASES_PER_DAY + MEAN_POINT_USE_RATE)


def draw_users(rng: np.random.Generator, n: int, world: World, k: Knobs) -> dict[str, np.ndarray]:
    """Latent and observed per-user quantities for n users."""
    K, T = world.n_topics, k.topics_per_user
    # A sparse mixture: T topic slots drawn by topic popularity (a repeat just adds weight),
    # with Dirichlet weights over the slots.
    topics = world.topic_prior(rng.random(n * T)).reshape(n, T)
    w = rng.standard_gamma(k.topic_concentration, size=(n, T)) + 1e-12
    w /= w.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    flat = (rows[:, None] * K + topics).ravel()
    theta = np.bincount(flat, weights=w.ravel(), minlength=n * K).reshape(n, K)
    # Current interests: half of the users move part of their mass to one topic (usually new to
    # them), which takes over their weakest slot.
    drift = rng.uniform(0.0, 0.6, size=n) * (rng.random(n) < 0.5)
    weakest = np.argmin(w, axis=1)
    topics_now, w_now = topics.copy(), w * (1.0 - drift)[:, None]
    topics_now[rows, weakest] = world.topic_prior(rng.random(n))
    w_now[rows, weakest] += drift
    w_now /= w_now.sum(axis=1, keepdims=True)

    act = rng.lognormal(-0.5 * k.activity_sigma**2, k.activity_sigma, size=n)  # mean 1
    u = {"theta": theta, "act": act, "topics": topics, "topic_cum": np.cumsum(w, axis=1),
         "topics_now": topics_now, "topic_cum_now": np.cumsum(w_now, axis=1)}
    # Favourite (genre, shop) pairs, drawn from the user's topics; slot weights 0.5/0.3/0.2.
    fav_rows = np.repeat(rows, 3)
    fav_genre = world.genre_of_topic(user_topics(rng, u, fav_rows), rng.random(3 * n))
    u["fav_genre"] = fav_genre.reshape(n, 3)
    u["fav_shop"] = world.shop_of_genre(fav_genre, rng.random(3 * n)).reshape(n, 3)

    female = rng.random(n) < theta @ world.topic_female
    u["gender"] = np.where(rng.random(n) < 0.08, -1, np.where(female, 0, 1))  # -1: not given
    age = theta @ world.topic_age + rng.normal(0.0, 8.0, size=n)
    u["age"] = np.clip(np.rint(age), 16, 85).astype(np.int32)
    u["age_null"] = rng.random(n) < 0.03
    u["region"] = sample_rows(world.topic_region_cdf, N_REGIONS, user_topics(rng, u, rows), rng.random(n))

    # Daily routine: a preferred hour (morning / lunch / evening peaks; older users earlier).
    peak = np.array([8.0, 12.5, 21.0])[pick(rng.random(n), (0.2, 0.5))]
    u["hour"] = peak + rng.normal(0.0, 1.5, size=n) + (40.0 - age) * 0.03
    u["hour_spread"] = rng.uniform(1.0, 3.0, size=n)
    p_app = 0.25 + 0.5 * sigmoid((40.0 - age) / 8.0)  # the young use the app
    r = rng.random(n)
    u["channel"] = np.where(r < p_app, 0, np.where(r < 0.9, 1, 2))
    r = rng.random(n)
    u["device"] = np.where(r < p_app, 0, 1 + pick(rng.random(n), (0.45, 0.9)))
    u["price_off"] = rng.normal(0.0, 0.3, size=n)
    u["p_point"] = rng.beta(1.0, 2.5, size=n)

    family_age = 1.2 * np.exp(-(((age - 38.0) / 10.0) ** 2)) - 0.6
    u["parent_logit"] = theta @ world.w_parent + family_age
    u["target_logit"] = theta @ world.w_target + 0.5 * np.log(act)
    return u


def user_topics(rng: np.random.Generator, users: dict, uid: np.ndarray, when: str = "") -> np.ndarray:
    """A topic per event from the user's long-term (``when=""``) or current (``"_now"``) mixture."""
    u = rng.random(len(uid))
    cum = users["topic_cum" + when]
    slot = np.zeros(len(uid), np.int64)
    for j in range(cum.shape[1] - 1):
        slot += u >= cum[uid, j]
    return users["topics" + when][uid, slot]


def pick_items(rng: np.random.Generator, world: World, users: dict, uid: np.ndarray, topic: np.ndarray,
               p_fav: float) -> tuple[np.ndarray, np.ndarray]:
    """(genre, shop) per event: one of the user's favourite pairs with probability ``p_fav``,
    else a genre of the event's topic (sometimes global popularity) and a shop selling it."""
    m = len(uid)
    topic = np.where(rng.random(m) < P_EXPLORE, world.n_topics, topic)
    genre = world.genre_of_topic(topic, rng.random(m))
    shop = world.shop_of_genre(genre, rng.random(m))
    fav = np.flatnonzero(rng.random(m) < p_fav)
    slot = pick(rng.random(len(fav)), (0.5, 0.8))
    genre[fav] = users["fav_genre"][uid[fav], slot]
    shop[fav] = users["fav_shop"][uid[fav], slot]
    return genre, shop


def _sorted_groups(uid: np.ndarray, start_s: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    """Reorder groups (purchase days, sessions) by (user, start time); uid is already grouped."""
    # start_s < 2**26 s (776 days); ties keep their order.
    order = np.argsort((uid.astype(np.int64) << 26) | start_s.astype(np.int64), kind="stable")
    return [a[order] for a in (uid, start_s, *arrays)]


def _offsets_in_group(sizes: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """Seconds since the group's first event: cumulative gaps within each run of ``sizes``."""
    starts = np.cumsum(sizes) - sizes
    gaps[starts] = 0.0
    cs = np.cumsum(gaps)
    return cs - np.repeat(cs[starts], sizes)


def long_events(rng: np.random.Generator, world: World, users: dict, k: Knobs) -> dict[str, np.ndarray]:
    """Purchases on active days over the window, and point usage right after some of them.

    Returns per-event arrays: uid (row in the chunk), day, local_s (seconds since local
    midnight of day 0), action (0 purchase, 1 point use), channel, price, shop, genre.
    """
    n = len(users["act"])
    n_days = rng.poisson(k.days_per_user * users["act"])
    uid_d = np.repeat(np.arange(n), n_days)
    nd = len(uid_d)
    day = world.long_day(rng.random(nd))
    hour = (users["hour"][uid_d] + users["hour_spread"][uid_d] * rng.standard_normal(nd)
            + 1.0 * world.weekend_long[day]) % 24.0  # weekends: a little later
    uid_d, start_s, day = _sorted_groups(uid_d, day * DAY + hour * 3600.0, day)

    # A day's events: 1 + Poisson purchases minutes apart, then maybe a point use at the end
    # (seconds after the last purchase, same shop, genre and channel).
    n_buy = 1 + rng.poisson(EXTRA_PURCHASES_PER_DAY, size=nd)
    has_point = rng.random(nd) < users["p_point"][uid_d]
    size = n_buy + has_point
    uid = np.repeat(uid_d, size)
    m = len(uid)
    last = np.cumsum(size) - 1
    point = last[has_point]
    gaps = rng.exponential(600.0, size=m)
    gaps[point] = rng.uniform(5.0, 120.0, size=len(point))
    local_s = np.repeat(start_s, size) + _offsets_in_group(size, gaps)

    genre, shop = pick_items(rng, world, users, uid, user_topics(rng, users, uid), P_FAVOURITE)
    price = np.exp(world.genre_log_price[genre] + users["price_off"][uid] + 0.45 * rng.standard_normal(m))
    price = np.maximum(10.0, np.round(price, -1))
    channel = np.where(rng.random(m) < 0.8, users["channel"][uid], pick(rng.random(m), (0.45, 0.9)))
    before = point - 1  # the day's last purchase
    genre[point], shop[point], channel[point] = genre[before], shop[before], channel[before]
    price[point] = np.minimum(price[before], np.round(rng.lognormal(np.log(500.0), 0.8, size=len(point))))
    action = np.zeros(m, np.int8)
    action[point] = 1
    return {"uid": uid, "day": np.repeat(day, size), "local_s": local_s, "action": action,
            "channel": channel, "price": price, "shop": shop, "genre": genre}


def short_events(rng: np.random.Generator, world: World, users: dict, k: Knobs) -> dict[str, np.ndarray]:
    """Browsing sessions over the last ``short_days``: one topic (of the current interests) and
    one device per session, events seconds to minutes apart, often re-viewing the last item.

    Returns per-event arrays: uid, day, local_s, action (0 page view, 1 click, 2 search), shop,
    genre, device; and n_sessions.
    """
    n = len(users["act"])
    # Browsing tracks buying, loosely; exp(0.12 s^2) restores the mean of act ** 0.6 to 1.
    act = (users["act"] ** 0.6 * np.exp(0.12 * k.activity_sigma**2)
           * rng.lognormal(-0.125, 0.5, size=n))
    n_sess = rng.poisson(k.short_events_per_user / k.session_length * act)
    uid_s = np.repeat(np.arange(n), n_sess)
    ns = len(uid_s)
    day = world.short_day(rng.random(ns)) + (k.window_days - k.short_days)
    hour = (users["hour"][uid_s] + 1.5 * users["hour_spread"][uid_s] * rng.standard_normal(ns)
            + 1.0 * world.weekend_short[day - (k.window_days - k.short_days)]) % 24.0
    uid_s, start_s, day = _sorted_groups(uid_s, day * DAY + hour * 3600.0, day)
    length = np.minimum(rng.geometric(1.0 / k.session_length, size=ns), 200)
    device = np.where(rng.random(ns) < 0.85, users["device"][uid_s], rng.integers(0, len(DEVICES), size=ns))
    topic = user_topics(rng, users, uid_s, "_now")

    uid = np.repeat(uid_s, length)
    m = len(uid)
    first = np.cumsum(length) - length
    # Gaps inside a session: seconds to a few minutes, never more than 25 minutes.
    gaps = np.minimum(rng.lognormal(np.log(40.0), 1.1, size=m), 1500.0)
    local_s = np.repeat(start_s, length) + _offsets_in_group(length, gaps)
    action = pick(rng.random(m), (0.55, 0.9))
    action[first] = np.where(rng.random(ns) < 0.35, 2, 0)  # sessions open with a search or a page view
    genre, shop = pick_items(rng, world, users, uid, np.repeat(topic, length), P_FAVOURITE_BROWSE)
    fresh = rng.random(m) >= P_REPEAT_IN_SESSION
    fresh[first] = True
    src = np.maximum.accumulate(np.where(fresh, np.arange(m), 0))  # last fresh event of the session
    return {"uid": uid, "day": np.repeat(day, length), "local_s": local_s, "action": action,
            "shop": shop[src], "genre": genre[src], "device": np.repeat(device, length), "n_sessions": ns}


def future_genres(rng: np.random.Generator, world: World, users: dict,
                  k: Knobs) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (user row, genre) pairs purchased in the ``future_days`` after the window,
    sorted by user then genre.  Drawn from the current interests and the favourites."""
    n = len(users["act"])
    rate = k.days_per_user * (1 + EXTRA_PURCHASES_PER_DAY) * k.future_days / k.window_days
    uid = np.repeat(np.arange(n), rng.poisson(rate * users["act"]))
    genre, _ = pick_items(rng, world, users, uid, user_topics(rng, users, uid, "_now"), P_FAVOURITE_FUTURE)
    key = np.unique(uid.astype(np.int64) * world.n_genres + genre)
    return key // world.n_genres, key % world.n_genres


def labels(rng: np.random.Generator, world: World, users: dict, k: Knobs) -> dict[str, np.ndarray]:
    """Rows (in the chunk) and labels of the is_parent and targeting tables."""
    n = len(users["act"])
    parent = rng.random(n) < sigmoid(users["parent_logit"] + world.b_parent)
    known = np.flatnonzero(rng.random(n) < k.parent_label_fraction)  # known for a random subset
    # Targeting: every responder of the campaign, and three times as many others, sampled.
    resp = rng.random(n) < sigmoid(users["target_logit"] + world.b_target)
    pos, neg = np.flatnonzero(resp), np.flatnonzero(~resp)
    neg = rng.choice(neg, size=min(len(neg), 3 * len(pos)), replace=False)
    target = np.sort(np.concatenate([pos, neg]))
    return {"parent_rows": known, "parent": parent[known].astype(np.int8),
            "target_rows": target, "target": resp[target].astype(np.int8)}
