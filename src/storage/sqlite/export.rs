//! The files of SPEC §4 written from a store (`clickagg export`), and a run's summary read from it.

use std::io::{self, Write};
use std::path::Path;

use rusqlite::OptionalExtension;

use clickagg_dataflows::Minute;

use super::{sql_error, Store};
use crate::model::Summary;
use crate::output::{write_quoted, write_ranked};

impl Store {
    /// The run's figures from the committed answers (when no output directory was written).
    pub fn summarize(&self, summary: &mut Summary) -> Result<(), String> {
        let err = |e: rusqlite::Error| sql_error(&self.path, e);
        let sum = |sql: &str| self.conn.query_row(sql, [], |r| r.get::<_, i64>(0)).map_err(err);
        summary.clicks = sum("SELECT coalesce(sum(clicks), 0) FROM ad_minute")? as u64;
        summary.excluded = sum("SELECT coalesce(sum(excluded_clicks), 0) FROM fraud_minute")? as u64;
        summary.minutes = sum("SELECT count(*) FROM (SELECT minute FROM ad_minute GROUP BY minute HAVING sum(clicks) > 0)")? as u64;
        let busiest: Option<(i64, i64)> = self
            .conn
            .query_row(
                "SELECT minute, sum(clicks) AS total FROM ad_minute GROUP BY minute HAVING total > 0 ORDER BY total DESC, minute ASC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(err)?;
        summary.busiest_minute = match busiest {
            None => None,
            Some((minute, total)) => {
                let mut top = self.minute_rows("SELECT ad_id, clicks FROM top_minute WHERE minute = ?1", minute)?;
                top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                top.truncate(10);
                Some((minute as Minute, total as u64, top))
            }
        };
        Ok(())
    }

    fn minute_rows(&self, sql: &str, minute: i64) -> Result<Vec<(u64, u64)>, String> {
        let mut statement = self.conn.prepare(sql).map_err(|e| sql_error(&self.path, e))?;
        statement
            .query_map([minute], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64)))
            .and_then(|rows| rows.collect())
            .map_err(|e| sql_error(&self.path, e))
    }

    /// Writes SPEC §4's files from the committed answers, byte for byte as `run --out` writes
    /// them after a replay of the same logs.
    pub fn export(&self, dir: &Path) -> Result<(), String> {
        let err = |e: rusqlite::Error| sql_error(&self.path, e);
        let io_err = |e: io::Error| format!("writing {}: {e}", dir.display());
        std::fs::create_dir_all(dir.join("changelog")).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let create = |name: &str| crate::output::create(&dir.join(name)).map_err(|e| e.to_string());
        // Plain per-minute tables: (minute, key..., clicks), sorted as unsigned numbers.
        for (file, header, sql) in [
            ("ad_minute.csv", "minute,ad_id,clicks", "SELECT minute, ad_id, clicks FROM ad_minute"),
            ("campaign_minute.csv", "minute,campaign_id,clicks", "SELECT minute, campaign_id, clicks FROM campaign_minute"),
            ("fraud_minute.csv", "minute,ad_id,excluded_clicks", "SELECT minute, ad_id, excluded_clicks FROM fraud_minute"),
        ] {
            let mut rows = self.triples(sql)?;
            rows.sort_unstable();
            let mut out = create(file)?;
            writeln!(out, "{header}").map_err(io_err)?;
            for (minute, key, clicks) in rows {
                writeln!(out, "{minute},{key},{clicks}").map_err(io_err)?;
            }
            out.flush().map_err(io_err)?;
        }
        let mut statement = self.conn.prepare("SELECT minute, country, ad_id, clicks FROM country_minute").map_err(err)?;
        let mut rows: Vec<(u64, String, u64, u64)> = statement
            .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get::<_, i64>(2)? as u64, r.get::<_, i64>(3)? as u64)))
            .and_then(|rows| rows.collect())
            .map_err(err)?;
        rows.sort_unstable();
        let mut out = create("country_minute.csv")?;
        writeln!(out, "minute,country,ad_id,clicks").map_err(io_err)?;
        for (minute, country, ad, clicks) in rows {
            writeln!(out, "{minute},{country},{ad},{clicks}").map_err(io_err)?;
        }
        out.flush().map_err(io_err)?;

        let mut out = create("top_minute.csv")?;
        writeln!(out, "minute,rank,ad_id,clicks").map_err(io_err)?;
        let mut rows = self.triples("SELECT minute, ad_id, clicks FROM top_minute")?;
        rows.sort_unstable();
        for group in rows.chunk_by(|a, b| a.0 == b.0) {
            let mut ranked: Vec<(u64, u64)> = group.iter().map(|&(_, ad, clicks)| (ad, clicks)).collect();
            write_ranked(&mut out, group[0].0 as Minute, &mut ranked).map_err(io_err)?;
        }
        out.flush().map_err(io_err)?;

        // Window snapshots run to the last minute's end, as a replay's files do.
        let last_boundary = self.committed()?.and_then(|c| c.last_minute).map_or(0, |m| m as u64 + 1);
        let windows = self.settings()?.windows;
        for window in windows {
            let mut out = create(&format!("top_window_{window}m.csv"))?;
            writeln!(out, "as_of,rank,ad_id,clicks").map_err(io_err)?;
            let mut statement =
                self.conn.prepare("SELECT as_of, ad_id, clicks FROM top_window WHERE window_minutes = ?1").map_err(err)?;
            let mut rows: Vec<(u64, u64, u64)> = statement
                .query_map([window], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64)))
                .and_then(|rows| rows.collect())
                .map_err(err)?;
            rows.retain(|r| r.0 <= last_boundary);
            rows.sort_unstable();
            for group in rows.chunk_by(|a, b| a.0 == b.0) {
                let mut ranked: Vec<(u64, u64)> = group.iter().map(|&(_, ad, clicks)| (ad, clicks)).collect();
                write_ranked(&mut out, group[0].0 as Minute, &mut ranked).map_err(io_err)?;
            }
            out.flush().map_err(io_err)?;
        }

        let mut out = create("dead_letter.csv")?;
        writeln!(out, "partition,offset,reason,line").map_err(io_err)?;
        let mut statement = self.conn.prepare("SELECT partition, offset, reason, line FROM dead_letter").map_err(err)?;
        let mut rows: Vec<(String, u64, String, Vec<u8>)> = statement
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?, r.get(3)?)))
            .and_then(|rows| rows.collect())
            .map_err(err)?;
        rows.sort_unstable();
        for (partition, offset, reason, line) in rows {
            write!(out, "{partition},{offset},{reason},").map_err(io_err)?;
            write_quoted(&mut out, &line).map_err(io_err)?;
            out.write_all(b"\n").map_err(io_err)?;
        }
        out.flush().map_err(io_err)?;

        let mut out = create("changelog/updates.csv")?;
        writeln!(out, "time,view,key,value,diff").map_err(io_err)?;
        let mut statement = self.conn.prepare("SELECT time, view, key, value, diff FROM changelog ORDER BY seq").map_err(err)?;
        let mut rows = statement.query([]).map_err(err)?;
        while let Some(row) = rows.next().map_err(err)? {
            let (time, view, key, value, diff): (i64, String, String, i64, i64) =
                (row.get(0).map_err(err)?, row.get(1).map_err(err)?, row.get(2).map_err(err)?, row.get(3).map_err(err)?, row.get(4).map_err(err)?);
            writeln!(out, "{},{view},{key},{},{diff}", time as u64, value as u64).map_err(io_err)?;
        }
        out.flush().map_err(io_err)
    }

    fn triples(&self, sql: &str) -> Result<Vec<(u64, u64, u64)>, String> {
        let mut statement = self.conn.prepare(sql).map_err(|e| sql_error(&self.path, e))?;
        statement
            .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64)))
            .and_then(|rows| rows.collect())
            .map_err(|e| sql_error(&self.path, e))
    }
}
