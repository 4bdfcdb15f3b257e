"""The hidden "world" behind the synthetic logs, and the vectorised samplers that use it.

The world is everything shared by all users and fixed by the seed: latent topics with
Zipf-like genre distributions, the shops that sell each genre, genre price levels, how
demographics and the label-generating propensities depend on topics, and the calendar
(weekly seasonality, sale days).  :mod:`tokenizer.synthetic.generator` draws users and events from it
one chunk of users at a time.

Nothing here imports torch, and nothing loops over events in Python: fixed distributions are
sampled through guide tables (:class:`Categorical`), per-row ones with one ``searchsorted``
over row-offset CDFs (:func:`sample_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Vocabularies of the string attributes (index = code used in the generator).
LONG_ACTIONS = ("purchase", "point_use")
CHANNELS = ("app", "web", "store")
SHORT_ACTIONS = ("page_view", "click", "search")
DEVICES = ("smartphone_app", "smartphone_web", "pc", "tablet")
GENDERS = ("F", "M")
N_REGIONS = 47  # Japanese prefectures, "JP-01" .. "JP-47"
GLOBAL_IN_TOPIC = 0.08  # share of a topic's genre distribution that is global popularity


def sample_rows(cdf_flat: np.ndarray, width: int, rows: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Draw one category per event from the row ``rows[i]`` of a stack of CDFs.

    ``cdf_flat`` is ``(cdf + arange(n_rows)[:, None]).ravel()``: row r's CDF shifted into
    (r, r + 1], so the whole array is sorted and a single ``searchsorted`` for ``r + u``
    lands inside row r.  Returns column indices in [0, width).
    """
    idx = np.searchsorted(cdf_flat, rows + u, side="right") - rows * width
    # r + u can round up to r + 1 for u within 1e-16 of 1; keep it in the row.
    return np.minimum(idx, width - 1)


class Categorical:
    """Inverse-CDF sampling from a fixed distribution in O(1) per draw (a guide table).

    ``np.searchsorted`` costs a cache-missing binary search per draw; here a table of 4n bins
    gives, for each bin of u, the first category whose CDF exceeds the bin's start, and a fixed
    number of branch-free steps (the most categories any bin spans, usually 2-4) finishes.
    """

    def __init__(self, p: np.ndarray) -> None:
        cdf = _cdf(np.asarray(p, dtype=np.float64))
        n = len(cdf)
        self.bins = max(64, 4 * n)
        guide = np.searchsorted(cdf, np.arange(self.bins + 1) / self.bins, side="right")
        self.guide = np.minimum(guide, n - 1)  # bins + 1 entries: u == 1.0 is safe too
        self.steps = int(np.max(np.diff(self.guide))) if n > 1 else 0
        cdf[-1] = np.inf  # the walk below can never step past the last category
        self.cdf = cdf

    def __len__(self) -> int:
        return len(self.cdf)

    def __call__(self, u: np.ndarray) -> np.ndarray:
        """Category index for each uniform draw in [0, 1)."""
        idx = self.guide[(u * self.bins).astype(np.int64)]
        for _ in range(self.steps):
            idx += self.cdf[idx] <= u
        return idx


def pick(u: np.ndarray, thresholds: tuple[float, ...]) -> np.ndarray:
    """Index of the interval of ``thresholds`` (increasing) that each u falls in (int8)."""
    out = np.zeros(len(u), np.int8)
    for t in thresholds:
        out += u >= t
    return out


def row_cdfs(weights: np.ndarray) -> np.ndarray:
    """Normalised, row-shifted CDFs of a [rows, width] weight matrix, for :func:`sample_rows`."""
    w = np.asarray(weights, dtype=np.float64)
    cdf = np.cumsum(w, axis=1)
    cdf /= cdf[:, -1:]
    cdf[:, -1] = 1.0
    return (cdf + np.arange(w.shape[0])[:, None]).ravel()


def _cdf(p: np.ndarray) -> np.ndarray:
    c = np.cumsum(p)
    c /= c[-1]
    c[-1] = 1.0
    return c


def zipf_weights(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return w / w.sum()


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class World:
    n_topics: int
    n_genres: int
    n_shops: int
    genre_pop: np.ndarray  # [G] global genre popularity (Zipf over a random order)
    genre_by_rank: np.ndarray  # [G] genre ids, most popular first
    pop_rank: Categorical  # popularity by rank
    topic_members: np.ndarray  # [K, core] each topic's core genres, in the topic's rank order
    core_rank: Categorical  # Zipf over a core's ranks (the same shape for every topic)
    genre_shop_start: np.ndarray  # [G] first slot of the genre's shops in shop_of_slot
    genre_shop_count: np.ndarray  # [G] >= 1
    shop_of_slot: np.ndarray  # [n_shops] shop ids grouped by genre, most popular first
    genre_log_price: np.ndarray  # [G] mean log price (yen)
    topic_female: np.ndarray  # [K] P(female) of a user fully in the topic
    topic_age: np.ndarray  # [K] mean age
    topic_region_cdf: np.ndarray  # row CDFs [K * N_REGIONS]
    w_parent: np.ndarray  # [K] logit weight of each topic on being a parent
    w_target: np.ndarray  # [K] logit weight of each topic on responding to the campaign
    b_parent: float  # intercepts, calibrated on a pilot sample (see calibrate_intercept)
    b_target: float
    topic_prior: Categorical  # how common each topic is among users
    long_day: Categorical  # day of the window of a purchase day
    short_day: Categorical  # day (of the last short_days) of a browsing session
    weekend_long: np.ndarray  # [window_days] bool
    weekend_short: np.ndarray  # [short_days] bool

    def genre_of_topic(self, topics: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Genre per event from its topic's distribution; topic K means global popularity.

        A topic is a mixture: its core (Zipf over ranks) with weight 1 - GLOBAL_IN_TOPIC, else
        global popularity.  One uniform decides the component and, rescaled, the draw inside
        it, so a draw costs one uniform and two guide-table lookups.
        """
        core_u = np.clip((u - GLOBAL_IN_TOPIC) / (1.0 - GLOBAL_IN_TOPIC), 0.0, 1.0)
        out = self.topic_members[np.minimum(topics, self.n_topics - 1), self.core_rank(core_u)]
        glob = np.flatnonzero((topics >= self.n_topics) | (u < GLOBAL_IN_TOPIC))
        ug = u[glob]
        ug = np.where(topics[glob] >= self.n_topics, ug, ug / GLOBAL_IN_TOPIC)
        out[glob] = self.genre_by_rank[self.pop_rank(ug)]
        return out

    def shop_of_genre(self, genres: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Shop per event: a steep power law over the shops selling the genre (a few dominate)."""
        rank = (self.genre_shop_count[genres] * (u * u * np.sqrt(u))).astype(np.int64)  # u ** 2.5
        return self.shop_of_slot[self.genre_shop_start[genres] + rank]


def build_world(
    rng: np.random.Generator,
    *,
    n_topics: int,
    n_genres: int,
    n_shops: int,
    window_weekday0: int,
    window_days: int,
    short_days: int,
) -> World:
    """Draw the shared structure.  ``window_weekday0`` is the weekday (Mon = 0) of day 0."""
    K, G = n_topics, n_genres
    if n_shops < G:
        raise ValueError(f"n_shops ({n_shops}) must be >= n_genres ({G}): every genre needs a shop")

    # Global genre popularity: Zipf over a random order, so genre ids carry no rank.
    genre_by_rank = rng.permutation(G).astype(np.int64)
    genre_pop = np.empty(G)
    genre_pop[genre_by_rank] = zipf_weights(G, 1.0)

    # Topics: each concentrates on a core of genres (overlapping between topics, biased to
    # popular genres), with Zipf weights inside the core and a little global mass.
    core = int(min(G, max(20, 3 * G // K)))
    p_core = np.sqrt(genre_pop)
    p_core /= p_core.sum()
    topic_members = np.stack([rng.choice(G, size=core, replace=False, p=p_core) for _ in range(K)])
    topic_pop = rng.dirichlet(np.full(K, 3.0))  # some topics are more common than others

    # Shops: popular genres have more shops; every genre has at least one.
    extra = n_shops - G
    share = genre_pop**0.6
    counts = 1 + np.floor(extra * share / share.sum()).astype(np.int64)
    counts[np.argsort(-genre_pop)[: n_shops - counts.sum()]] += 1
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    shop_of_slot = rng.permutation(n_shops).astype(np.int64)

    # Demographics and label propensities by topic.  A few "family" topics drive parenthood
    # and a few "travel" topics drive the campaign response, so both are legible in behaviour.
    topic_female = rng.beta(0.8, 0.8, size=K)
    topic_age = rng.uniform(22.0, 64.0, size=K)
    region_base = zipf_weights(N_REGIONS, 0.8)[rng.permutation(N_REGIONS)]
    region_w = np.empty((K, N_REGIONS))
    for k in range(K):
        tilt = np.zeros(N_REGIONS)
        tilt[rng.choice(N_REGIONS, size=3, replace=False)] = rng.dirichlet(np.ones(3))
        region_w[k] = 0.6 * region_base + 0.4 * tilt
    w_parent = rng.normal(0.0, 0.8, size=K)
    w_parent[rng.choice(K, size=max(1, K // 6), replace=False)] += 5.0
    w_target = rng.normal(0.0, 0.6, size=K)
    w_target[rng.choice(K, size=max(1, K // 8), replace=False)] += 4.0

    # Calendar: weekends are busier for purchases; two sale days triple them; browsing is
    # mildly busier on weekends too.
    wd = (window_weekday0 + np.arange(window_days)) % 7
    weekend_long = wd >= 5
    long_w = np.where(weekend_long, 1.35, 1.0)
    long_w[rng.choice(window_days, size=min(2, window_days), replace=False)] *= 3.0
    weekend_short = weekend_long[window_days - short_days :]
    short_w = np.where(weekend_short, 1.2, 1.0)

    return World(
        n_topics=K,
        n_genres=G,
        n_shops=n_shops,
        genre_pop=genre_pop,
        genre_by_rank=genre_by_rank,
        pop_rank=Categorical(zipf_weights(G, 1.0)),
        topic_members=topic_members.astype(np.int64),
        core_rank=Categorical(zipf_weights(core, 1.1)),
        genre_shop_start=start,
        genre_shop_count=counts,
        shop_of_slot=shop_of_slot,
        genre_log_price=rng.normal(np.log(2500.0), 0.9, size=G),
        topic_female=topic_female,
        topic_age=topic_age,
        topic_region_cdf=row_cdfs(region_w),
        w_parent=w_parent,
        w_target=w_target,
        b_parent=0.0,
        b_target=0.0,
        topic_prior=Categorical(topic_pop),
        long_day=Categorical(long_w),
        short_day=Categorical(short_w),
        weekend_long=weekend_long,
        weekend_short=weekend_short,
    )


def calibrate_intercept(logits: np.ndarray, rate: float) -> float:
    """The intercept b with mean(sigmoid(logits + b)) == rate (bisection on a pilot sample)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if sigmoid(logits + mid).mean() < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)
