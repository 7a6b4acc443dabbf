#!/usr/bin/env python3
"""A peer: DuckDB doing clickagg's batch job on the same logs, written as a DuckDB user would.

The logs are read with `read_csv` and the column types declared, so DuckDB parses each number
once (no all_varchar + TRY_CAST); rows that do not parse are skipped (`ignore_errors`), where
clickagg dead-letters them, and so are rows whose event_id or country has the wrong length. Deliveries of one click (the same event_id and ts) count once; then
the per-minute counts per ad, campaign and country, and the top 100 ads of each minute, are
written as CSV. There is no notion of lateness (every distinct click counts: SPEC's
reconciliation rule), no changelog and no sliding windows, so the job does less than
`clickagg run`.

Two forms of the dedup, `--dedup`:
- `distinct-on` (default): `DISTINCT ON (event_id, ts)` with no ORDER BY, which keeps an
  arbitrary copy when copies disagree in other fields. That is what a DuckDB user writes, and the
  fastest form; it is exact only where copies agree (they do in the generated sets, but for rare
  conflicting retries).
- `exact`: SPEC's tie-break, the smallest row by (ad_id, campaign_id, user_id, ip, country), as
  `min({...})` of a struct per (event_id, ts) group.
Run by bench.py in the harness's own virtual environment.
"""

import argparse
from pathlib import Path

import duckdb

parser = argparse.ArgumentParser()
parser.add_argument("--logs", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--dedup", choices=["distinct-on", "exact"], default="distinct-on")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

con = duckdb.connect()
con.execute(f"SET threads = {args.threads}")
clicks = f"""
    read_csv('{args.logs}/part-*.csv', header = true, ignore_errors = true,
             columns = {{'event_id': 'VARCHAR', 'ts': 'BIGINT', 'ad_id': 'UBIGINT', 'campaign_id': 'UBIGINT',
                         'user_id': 'UBIGINT', 'ip': 'VARCHAR', 'country': 'VARCHAR'}})
"""
# The two field rules a typed read cannot check (SPEC §1), as a careful user adds them.
clicks = f"(SELECT * FROM {clicks} WHERE length(event_id) BETWEEN 1 AND 64 AND length(country) = 2)"
if args.dedup == "distinct-on":
    accepted = f"SELECT DISTINCT ON (event_id, ts) ts // 60000 AS minute, ad_id, campaign_id, country FROM {clicks}"
else:
    accepted = f"""
        SELECT ts // 60000 AS minute, first.ad_id AS ad_id, first.campaign_id AS campaign_id, first.country AS country
        FROM (SELECT ts, min({{'ad_id': ad_id, 'campaign_id': campaign_id, 'user_id': user_id, 'ip': ip,
                              'country': country}}) AS first
              FROM {clicks} GROUP BY event_id, ts)
    """
con.execute(f"CREATE TABLE accepted AS {accepted}")
con.execute("CREATE TABLE ad_minute AS SELECT minute, ad_id, count(*) AS clicks FROM accepted GROUP BY ALL")
for name, query in {
    "ad_minute": "SELECT * FROM ad_minute ORDER BY minute, ad_id",
    "campaign_minute": "SELECT minute, campaign_id, count(*) AS clicks FROM accepted GROUP BY ALL ORDER BY ALL",
    "country_minute": "SELECT minute, country, ad_id, count(*) AS clicks FROM accepted GROUP BY ALL ORDER BY ALL",
    "top_minute": """SELECT minute, rank, ad_id, clicks FROM (
                         SELECT *, row_number() OVER (PARTITION BY minute ORDER BY clicks DESC, ad_id) AS rank
                         FROM ad_minute)
                     WHERE rank <= 100 ORDER BY minute, rank""",
}.items():
    con.execute(f"COPY ({query}) TO '{out / (name + '.csv')}' (HEADER)")
