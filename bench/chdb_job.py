#!/usr/bin/env python3
"""A peer: chDB (ClickHouse embedded in Python) doing clickagg's batch job, as a ClickHouse user
would write it.

The logs are read with the `file` table function and a declared structure
(`CSVWithNames`; rows that do not parse are skipped by `input_format_allow_errors_ratio`, where
clickagg dead-letters them, and so are rows whose event_id or country has the wrong length). Deliveries of one click count once with `LIMIT 1 BY event_id, ts`
(the ClickHouse idiom: an arbitrary copy when copies disagree, as DuckDB's DISTINCT ON). Then the
per-minute counts per ad, campaign and country and the top 100 ads of each minute go to CSV
files. No lateness, changelog or sliding windows, as for the DuckDB peer.
Run by bench.py in the harness's own virtual environment.
"""

import argparse
import tempfile
from pathlib import Path

from chdb import session

parser = argparse.ArgumentParser()
parser.add_argument("--logs", required=True)
parser.add_argument("--out", required=True)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()
out = Path(args.out).resolve()
out.mkdir(parents=True, exist_ok=True)
for old in out.glob("*.csv"):
    old.unlink()

structure = "event_id String, ts Int64, ad_id UInt64, campaign_id UInt64, user_id UInt64, ip String, country String"
settings = (f"SETTINGS max_threads = {args.threads}, input_format_allow_errors_ratio = 1, "
            "input_format_allow_errors_num = 1000000000")
with tempfile.TemporaryDirectory(prefix="chdb-") as path:
    db = session.Session(path)
    db.query("CREATE DATABASE IF NOT EXISTS bench")
    db.query("CREATE TABLE bench.accepted (minute Int64, ad_id UInt64, campaign_id UInt64, country String) ENGINE = Memory")
    db.query(f"""
        INSERT INTO bench.accepted
        SELECT intDiv(ts, 60000), ad_id, campaign_id, country
        FROM file('{Path(args.logs).resolve()}/part-*.csv', CSVWithNames, '{structure}')
        WHERE length(event_id) BETWEEN 1 AND 64 AND length(country) = 2
        LIMIT 1 BY event_id, ts
        {settings}
    """)
    db.query(f"""CREATE TABLE bench.ad_minute ENGINE = Memory AS
                 SELECT minute, ad_id, count() AS clicks FROM bench.accepted GROUP BY minute, ad_id {settings}""")
    for name, query in {
        "ad_minute": "SELECT * FROM bench.ad_minute ORDER BY minute, ad_id",
        "campaign_minute": "SELECT minute, campaign_id, count() AS clicks FROM bench.accepted "
                           "GROUP BY minute, campaign_id ORDER BY minute, campaign_id",
        "country_minute": "SELECT minute, country, ad_id, count() AS clicks FROM bench.accepted "
                          "GROUP BY minute, country, ad_id ORDER BY minute, country, ad_id",
        "top_minute": "SELECT minute, rank, ad_id, clicks FROM (SELECT minute, ad_id, clicks, "
                      "row_number() OVER (PARTITION BY minute ORDER BY clicks DESC, ad_id) AS rank FROM bench.ad_minute) "
                      "WHERE rank <= 100 ORDER BY minute, rank",
    }.items():
        db.query(f"INSERT INTO FUNCTION file('{out / (name + '.csv')}', CSVWithNames) {query} {settings}")
    db.close()
