#!/usr/bin/env python3
"""The peer: DuckDB doing clickagg's batch job on the same logs, as a user would write it.

Dedup by (event_id, ts) keeping the smallest row by (ad_id, campaign_id, user_id, ip, country),
the four per-minute files and the top 100 of each minute, written as CSV. It has no notion of
lateness (every distinct click counts, SPEC's reconciliation rule) and drops malformed rows
instead of dead-lettering them, so it does a little less than `clickagg run`.
Run by bench.py in the harness's own virtual environment.
"""

import argparse
from pathlib import Path

import duckdb

parser = argparse.ArgumentParser()
parser.add_argument("--logs", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

con = duckdb.connect()
con.execute(f"SET threads = {args.threads}")
con.execute(f"""
CREATE TABLE clicks AS
SELECT * FROM (
    SELECT event_id,
           TRY_CAST(ts AS BIGINT) AS ts,
           TRY_CAST(ad_id AS UBIGINT) AS ad_id,
           TRY_CAST(campaign_id AS UBIGINT) AS campaign_id,
           TRY_CAST(user_id AS UBIGINT) AS user_id,
           ip,
           upper(country) AS country
    FROM read_csv('{args.logs}/part-*.csv', header = true, all_varchar = true, ignore_errors = true)
)
WHERE ts IS NOT NULL AND ad_id IS NOT NULL AND campaign_id IS NOT NULL AND user_id IS NOT NULL
  AND length(event_id) BETWEEN 1 AND 64 AND length(country) = 2 AND ip IS NOT NULL
""")
con.execute("""
CREATE TABLE accepted AS
SELECT DISTINCT ON (event_id, ts) ts // 60000 AS minute, ad_id, campaign_id, country
FROM clicks
ORDER BY event_id, ts, ad_id, campaign_id, user_id, ip, country
""")
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
