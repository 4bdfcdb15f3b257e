"""Complete Journey 2.0 (sample, CC0) -> userbert-engine's canonical input, a schema and three label tables.

    python examples/completejourney/convert.py --out cj            # then:
    userbert-engine tokenize --schema cj/schema.toml --out cj/tok

Mapping (one behaviour segment, ``long``: purchases, one word per 04:00-to-04:00 day):

    store_id          -> shop
    product_category  -> genre        (about 290 values)
    department        -> department   (26)
    brand             -> brand        (National / Private)
    sales_value       -> price        (bucketed, see PRICE_BUCKETS)
    transaction time  -> hour         (@hour)

User attributes (households with demographics, 801 of 2,377): age, income, home_ownership,
marital_status.  household_size, household_comp and kids_count are left out: they give the
has-kids label away.

Time: transactions before ``--cut`` (default 2017-11-01) are the pretraining window; what happens
after it makes the labels, so no label is visible in the model's input:

- ``labels/has_kids.parquet``: kids_count > 0 for households with demographics (binary; ROC AUC)
- ``labels/campaign_response.parquet``: households that received a campaign starting within a
  week of the cut or later (campaigns 18-23 by default) -> 1 if they redeemed one of its coupons
  (binary, targeting)
- ``labels/next_category.parquet``: the distinct product categories a household bought after the
  cut (next; mAP@10 over the category vocabulary)

Timestamps are the stores' wall-clock times, written as naive timestamps and read in UTC, so the
hour and the day boundary are the local ones.  Needs pyarrow only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
WINDOW_START = "2017-01-01T00:00:00"
DEFAULT_CUT = "2017-11-01"
# sales_value in dollars; boundaries near the quantiles of the sample (median ~2.5)
PRICE_BUCKETS = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0, 10.0, 20.0]
USER_ATTRIBUTES = ["age", "income", "home_ownership", "marital_status"]

SCHEMA = """\
# Complete Journey 2.0 sample (CC0), written by examples/completejourney/convert.py.
# One behaviour segment: purchases, one word per 04:00-to-04:00 day.
[data]
users = "users.parquet"
user_column = "user_id"
window_start = "{start}"
window_end = "{end}"
timezone = "UTC"            # the stores' wall-clock times are stored as naive (UTC) timestamps

[segments.long]
path = "long"
time_column = "ts"
word_rule = "daily"
day_start_hour = 4
position_unit = "day"
max_words = 128
max_actions_per_word = 32
attributes = [
  {{ name = "shop",       column = "shop",       dim = 16 }},
  {{ name = "genre",      column = "genre",      dim = 32 }},
  {{ name = "department", column = "department", dim = 8 }},
  {{ name = "brand",      column = "brand",      dim = 4 }},
  {{ name = "price",      column = "price",      dim = 8, buckets = {buckets} }},
  {{ name = "hour",       column = "@hour",      dim = 8 }},
]
{user_attributes}"""


def _read_csv(path: Path, types: dict[str, pa.DataType] | None = None) -> pa.Table:
    opts = pcsv.ConvertOptions(column_types=types or {}, strings_can_be_null=True)
    return pcsv.read_csv(path, convert_options=opts)


def _utc_seconds(day: str) -> int:
    return int(dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp())


def convert(out_dir: str | Path, *, data_dir: str | Path = DATA, cut: str = DEFAULT_CUT,
            campaign_lead_days: int = 7, max_households: int | None = None) -> dict:
    """Write DIR/{long/, users.parquet, labels/, schema.toml, CONVERT.json}; returns the counts.

    ``max_households``: keep only the households with the smallest ids (for quick tests).
    """
    data_dir, out = Path(data_dir), Path(out_dir)
    cut_ts = pa.scalar(dt.datetime.fromisoformat(cut), pa.timestamp("s"))
    tx = _read_csv(data_dir / "transactions_sample.csv.gz",
                   {"household_id": pa.int64(), "store_id": pa.string(), "product_id": pa.int64(),
                    "sales_value": pa.float64(), "transaction_timestamp": pa.timestamp("s")})
    products = _read_csv(data_dir / "products_in_sample.csv.gz", {"product_id": pa.int64()})
    demo = _read_csv(data_dir / "demographics.csv", {"household_id": pa.int64(), "kids_count": pa.string()})
    campaigns = _read_csv(data_dir / "campaigns.csv", {"household_id": pa.int64()})
    descriptions = _read_csv(data_dir / "campaign_descriptions.csv", {"start_date": pa.date32()})
    redemptions = _read_csv(data_dir / "coupon_redemptions.csv", {"household_id": pa.int64()})
    if max_households:
        keep = pc.sort_indices(pc.unique(tx["household_id"]))[:max_households]
        hh = pc.unique(tx["household_id"]).take(keep)
        tx = tx.filter(pc.is_in(tx["household_id"], value_set=hh))

    tx = tx.select(["household_id", "store_id", "product_id", "sales_value", "transaction_timestamp"]).join(
        products.select(["product_id", "department", "brand", "product_category"]), "product_id",
        join_type="left outer")
    events = pa.table({
        "user_id": tx["household_id"], "ts": tx["transaction_timestamp"], "shop": tx["store_id"],
        "genre": tx["product_category"], "department": tx["department"], "brand": tx["brand"],
        "price": tx["sales_value"],
    })
    events = events.sort_by([("user_id", "ascending"), ("ts", "ascending")])
    before = pc.less(events["ts"], cut_ts)
    history, future = events.filter(before), events.filter(pc.invert(before))
    (out / "long").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    pq.write_table(history, out / "long" / "part-00000.parquet")
    users_with_history = pc.unique(history["user_id"])

    # users.parquet: demographics without the fields that give the has-kids label away
    # (only households with a purchase history: a user with no behaviour has nothing to learn from)
    demo_hist = demo.filter(pc.is_in(demo["household_id"], value_set=users_with_history))
    users = pa.table({"user_id": demo_hist["household_id"], **{a: demo_hist[a] for a in USER_ATTRIBUTES}})
    pq.write_table(users, out / "users.parquet")

    counts: dict[str, int | str] = {"cut": cut, "events_before_cut": history.num_rows,
                                    "events_after_cut": future.num_rows,
                                    "households_with_history": len(users_with_history)}
    # has_kids: households with demographics (and a purchase history to read)
    kids = demo_hist
    label = pc.not_equal(kids["kids_count"], "0").cast(pa.int8())
    pq.write_table(pa.table({"user_id": kids["household_id"], "label": label}), out / "labels" / "has_kids.parquet")
    counts["has_kids_users"], counts["has_kids_positive"] = kids.num_rows, int(pc.sum(label).as_py())

    # campaign_response: recipients of campaigns that start within campaign_lead_days of the cut or later
    first = dt.date.fromisoformat(cut) - dt.timedelta(days=campaign_lead_days)
    late = descriptions.filter(pc.greater_equal(descriptions["start_date"], pa.scalar(first, pa.date32())))
    late_ids = late["campaign_id"]
    got = campaigns.filter(pc.is_in(campaigns["campaign_id"], value_set=late_ids))
    recipients = pc.unique(got["household_id"])
    recipients = recipients.filter(pc.is_in(recipients, value_set=users_with_history))
    redeemed = redemptions.filter(pc.is_in(redemptions["campaign_id"], value_set=late_ids))
    responded = pc.is_in(recipients, value_set=pc.unique(redeemed["household_id"])).cast(pa.int8())
    pq.write_table(pa.table({"user_id": recipients, "label": responded}),
                   out / "labels" / "campaign_response.parquet")
    counts["campaigns"] = ",".join(str(c) for c in sorted(late_ids.to_pylist()))
    counts["campaign_users"], counts["campaign_positive"] = len(recipients), int(pc.sum(responded).as_py())

    # next_category: distinct categories bought after the cut, for households with a history
    fut = future.filter(pc.and_(pc.is_in(future["user_id"], value_set=users_with_history),
                                pc.is_valid(future["genre"])))
    grouped = fut.group_by("user_id").aggregate([("genre", "distinct")]).sort_by("user_id")
    nxt = pa.table({"user_id": grouped["user_id"], "label": grouped["genre_distinct"]})
    pq.write_table(nxt, out / "labels" / "next_category.parquet")
    lens = pc.list_value_length(nxt["label"]).to_numpy()
    counts["next_users"], counts["next_mean_categories"] = nxt.num_rows, round(float(np.mean(lens)), 2)

    ua = "".join(f'\n[[user_attributes]]\nname = "{a}"\n' for a in USER_ATTRIBUTES)
    end = dt.datetime.fromisoformat(cut).strftime("%Y-%m-%dT%H:%M:%S")
    (out / "schema.toml").write_text(SCHEMA.format(start=WINDOW_START, end=end, buckets=PRICE_BUCKETS,
                                                   user_attributes=ua))
    (out / "CONVERT.json").write_text(json.dumps(counts, indent=2) + "\n")
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--data", type=Path, default=DATA, help=f"the Complete Journey CSV files (default: {DATA})")
    p.add_argument("--cut", default=DEFAULT_CUT, help="end of the pretraining window, start of the label window")
    p.add_argument("--campaign-lead-days", type=int, default=7,
                   help="targeting uses campaigns starting this many days before the cut or later")
    args = p.parse_args(argv)
    counts = convert(args.out, data_dir=args.data, cut=args.cut, campaign_lead_days=args.campaign_lead_days)
    print(json.dumps(counts, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
