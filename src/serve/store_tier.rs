//! The server's second tier: minutes that are final and committed, read from the store (SPEC §6).
//!
//! The store's tables are already the committed answers (`store_serving` adds the serving-only
//! ones and the indexes each query here needs). Reads go through a few read-only connections
//! (the store is in write-ahead-log mode, so they run beside the committer without blocking
//! it), each with its statements prepared once and cached. A final minute never changes once
//! committed, so a read needs no snapshot shared with the memory tier: the caller bounds each
//! query to the minutes the memory tier no longer holds.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use clickagg_dataflows::{Country, Minute};
use rusqlite::{Connection, OpenFlags};

use crate::model::{HistoryEntry, Subject};
use crate::storage::sqlite::serving::{country_text, SPAN_MINUTES};

// The by-id counts read one span of the by-span indexes at a time (`?4`, `minute / 64`: see
// `SPAN_MINUTES`).
const AD_COUNT: &str =
    "SELECT coalesce(sum(clicks), 0) FROM ad_minute WHERE minute / 64 = ?4 AND ad_id = ?1 AND minute >= ?2 AND minute < ?3";
const CAMPAIGN_COUNT: &str = "SELECT coalesce(sum(clicks), 0) FROM campaign_minute \
     WHERE minute / 64 = ?4 AND campaign_id = ?1 AND minute >= ?2 AND minute < ?3";
const AD_COUNTRY_COUNT: &str = "SELECT coalesce(sum(clicks), 0) FROM country_minute \
     WHERE minute / 64 = ?4 AND ad_id = ?1 AND country = ?5 AND minute >= ?2 AND minute < ?3";
const CAMPAIGN_COUNTRY_COUNT: &str = "SELECT coalesce(sum(clicks), 0) FROM campaign_country_minute \
     WHERE minute / 64 = ?4 AND campaign_id = ?1 AND country = ?5 AND minute >= ?2 AND minute < ?3";
const TOP_MINUTE: &str = "SELECT ad_id, clicks FROM top_minute WHERE minute = ?1";
const TOP_COUNTRY_MINUTE: &str = "SELECT ad_id, clicks FROM top_country_minute WHERE minute = ?1 AND country = ?2";
const AD_ROWS: &str = "SELECT ad_id, clicks FROM ad_minute WHERE minute >= ?1 AND minute < ?2";
const COUNTRY_ROWS: &str = "SELECT ad_id, clicks FROM country_minute WHERE minute >= ?1 AND minute < ?2 AND country = ?3";
const HISTORY: &str = "SELECT time, value, diff FROM changelog WHERE view = 'ad_minute' AND key = ?1 ORDER BY seq";
const AD_MINUTE: &str = "SELECT clicks FROM ad_minute WHERE minute = ?1 AND ad_id = ?2";
const MINUTES: &str = "SELECT count(*) FROM (SELECT DISTINCT minute FROM ad_minute WHERE minute < ?1)";

/// Each query the API sends, with what its plan must show (`EXPLAIN QUERY PLAN`): the index or
/// primary key that bounds it. Checked by `store_serving`'s tests.
pub const QUERIES: [(&str, &str); 10] = [
    (AD_COUNT, "USING COVERING INDEX ad_minute_by_span_ad (<expr>=? AND ad_id=? AND minute>? AND minute<?)"),
    (CAMPAIGN_COUNT, "USING COVERING INDEX campaign_minute_by_span_campaign (<expr>=? AND campaign_id=? AND minute>? AND minute<?)"),
    (AD_COUNTRY_COUNT, "USING COVERING INDEX country_minute_by_span_ad (<expr>=? AND ad_id=? AND country=? AND minute>? AND minute<?)"),
    (
        CAMPAIGN_COUNTRY_COUNT,
        "USING COVERING INDEX campaign_country_minute_by_span_campaign (<expr>=? AND campaign_id=? AND country=? AND minute>? AND minute<?)",
    ),
    (TOP_MINUTE, "USING PRIMARY KEY (minute=?)"),
    (TOP_COUNTRY_MINUTE, "USING PRIMARY KEY (minute=? AND country=?)"),
    (AD_ROWS, "USING PRIMARY KEY (minute>? AND minute<?)"),
    (COUNTRY_ROWS, "USING PRIMARY KEY (minute>? AND minute<?)"),
    (HISTORY, "USING INDEX changelog_ad_minute (key=?)"),
    (AD_MINUTE, "USING PRIMARY KEY (minute=? AND ad_id=?)"),
];

/// How many idle read connections are kept; more are opened while many queries overlap.
const POOL: usize = 4;

/// Each reader's page cache: old minutes are read a few pages at a time, and the operating
/// system caches the file too; a large cache per connection would be memory that grows with
/// the store.
const READER_CACHE_KIB: i64 = 4 * 1024;

/// Read-only access to a store's committed answers.
pub struct StoreTier {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl std::fmt::Debug for StoreTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTier").field("path", &self.path).finish_non_exhaustive()
    }
}

fn sql_error(path: &Path, e: rusqlite::Error) -> String {
    format!("reading the store {}: {e}", path.display())
}

impl StoreTier {
    /// Opens the store at `path` for reading; fails at once if it cannot be read.
    pub fn open(path: &Path) -> Result<StoreTier, String> {
        let tier = StoreTier { path: path.to_path_buf(), idle: Mutex::new(Vec::new()) };
        let conn = tier.connect()?;
        tier.release(conn);
        Ok(tier)
    }

    fn connect(&self) -> Result<Connection, String> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(|e| sql_error(&self.path, e))?;
        // The committer holds the write lock for a moment at a time; a checkpoint may too.
        conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(|e| sql_error(&self.path, e))?;
        conn.pragma_update(None, "cache_size", -READER_CACHE_KIB).map_err(|e| sql_error(&self.path, e))?;
        conn.set_prepared_statement_cache_capacity(QUERIES.len() + 2);
        Ok(conn)
    }

    fn release(&self, conn: Connection) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < POOL {
                idle.push(conn);
            }
        }
    }

    /// Runs `read` on an idle connection (or a new one), which then goes back to the pool.
    fn with<R>(&self, read: impl FnOnce(&Connection) -> rusqlite::Result<R>) -> Result<R, String> {
        let conn = match self.idle.lock().ok().and_then(|mut idle| idle.pop()) {
            Some(conn) => conn,
            None => self.connect()?,
        };
        let result = read(&conn).map_err(|e| sql_error(&self.path, e));
        self.release(conn);
        result
    }

    /// Clicks of `subject` with minute in `[from, to)`, in `country` if given.
    pub fn count(&self, subject: Subject, from: Minute, to: Minute, country: Option<Country>) -> Result<u64, String> {
        if from >= to {
            return Ok(0);
        }
        let (sql, id) = match (subject, country) {
            (Subject::Ad(ad), None) => (AD_COUNT, ad),
            (Subject::Campaign(campaign), None) => (CAMPAIGN_COUNT, campaign),
            (Subject::Ad(ad), Some(_)) => (AD_COUNTRY_COUNT, ad),
            (Subject::Campaign(campaign), Some(_)) => (CAMPAIGN_COUNTRY_COUNT, campaign),
        };
        let letters = country.map(|c| c.as_bytes());
        let spans = from / SPAN_MINUTES..=(to - 1) / SPAN_MINUTES;
        self.with(|conn| {
            let mut statement = conn.prepare_cached(sql)?;
            // Ids are stored as the i64 bit patterns of u64s.
            statement.raw_bind_parameter(1, id as i64)?;
            statement.raw_bind_parameter(2, from)?;
            statement.raw_bind_parameter(3, to)?;
            if let Some(letters) = &letters {
                statement.raw_bind_parameter(5, country_text(letters))?;
            }
            let mut total = 0;
            for span in spans {
                statement.raw_bind_parameter(4, span)?;
                let mut rows = statement.raw_query();
                let row = rows.next()?.ok_or(rusqlite::Error::QueryReturnedNoRows)?;
                total += row.get::<_, i64>(0)? as u64;
            }
            Ok(total)
        })
    }

    /// Each ad's clicks summed over minutes `[from, to)`, in `country` if given, added to `sums`.
    pub fn add_sums(&self, from: Minute, to: Minute, country: Option<Country>, sums: &mut std::collections::HashMap<u64, u64>) -> Result<(), String> {
        if from >= to {
            return Ok(());
        }
        let letters = country.map(|c| c.as_bytes());
        self.with(|conn| {
            let mut statement = conn.prepare_cached(if letters.is_some() { COUNTRY_ROWS } else { AD_ROWS })?;
            statement.raw_bind_parameter(1, from)?;
            statement.raw_bind_parameter(2, to)?;
            if let Some(letters) = &letters {
                statement.raw_bind_parameter(3, country_text(letters))?;
            }
            let mut rows = statement.raw_query();
            while let Some(row) = rows.next()? {
                *sums.entry(row.get::<_, i64>(0)? as u64).or_insert(0) += row.get::<_, i64>(1)? as u64;
            }
            Ok(())
        })
    }

    /// The maintained top K of `minute` (in `country` if given) as committed, ranked; `None`
    /// when the store has no member for it.
    pub fn top_of_minute(&self, minute: Minute, country: Option<Country>) -> Result<Option<Vec<(u64, u64)>>, String> {
        let letters = country.map(|c| c.as_bytes());
        let mut top: Vec<(u64, u64)> = self.with(|conn| {
            let mut statement = conn.prepare_cached(if letters.is_some() { TOP_COUNTRY_MINUTE } else { TOP_MINUTE })?;
            statement.raw_bind_parameter(1, minute)?;
            if let Some(letters) = &letters {
                statement.raw_bind_parameter(2, country_text(letters))?;
            }
            let mut rows = statement.raw_query();
            let mut top = Vec::new();
            while let Some(row) = rows.next()? {
                top.push((row.get::<_, i64>(0)? as u64, row.get::<_, i64>(1)? as u64));
            }
            Ok(top)
        })?;
        if top.is_empty() {
            return Ok(None);
        }
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(Some(top))
    }

    /// `ad`'s clicks in `minute` as committed, and every update of it in the changelog, in order.
    pub fn history(&self, ad: u64, minute: Minute) -> Result<(u64, Vec<HistoryEntry>), String> {
        // The changelog's key of an `ad_minute` row, as the sink writes it.
        let key = format!("{minute}/{ad}");
        self.with(|conn| {
            let mut statement = conn.prepare_cached(HISTORY)?;
            let updates = statement
                .query_map([&key], |r| {
                    Ok(HistoryEntry { time: r.get::<_, i64>(0)? as u64, clicks: r.get::<_, i64>(1)? as u64, diff: r.get(2)? })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let mut statement = conn.prepare_cached(AD_MINUTE)?;
            let mut rows = statement.query(rusqlite::params![minute, ad as i64])?;
            let clicks = match rows.next()? {
                Some(row) => row.get::<_, i64>(0)? as u64,
                None => 0,
            };
            Ok((clicks, updates))
        })
    }

    /// How many minutes before `minute` have clicks.
    pub fn minutes_before(&self, minute: Minute) -> Result<u64, String> {
        self.with(|conn| conn.query_row(MINUTES, [minute], |r| r.get::<_, i64>(0)).map(|n| n as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts over ranges that start, end and cross anywhere in the by-span indexes' spans
    /// equal the sum of the rows in the range.
    #[test]
    fn counts_over_ranges_across_spans_are_the_sums_of_their_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.db");
        let conn = rusqlite::Connection::open(&path).unwrap();
        crate::storage::sqlite::serving::create_all(&conn).unwrap();
        let clicks = |minute: u32, id: u64| (minute as u64 * 7 + id) % 5;
        for minute in 0..300u32 {
            for id in [1u64, 2] {
                conn.execute("INSERT INTO ad_minute (minute, ad_id, clicks) VALUES (?1, ?2, ?3)", rusqlite::params![minute, id as i64, clicks(minute, id) as i64]).unwrap();
                conn.execute("INSERT INTO campaign_minute (minute, campaign_id, clicks) VALUES (?1, ?2, ?3)", rusqlite::params![minute, id as i64, clicks(minute, id) as i64]).unwrap();
                conn.execute("INSERT INTO country_minute (minute, country, ad_id, clicks) VALUES (?1, 'AU', ?2, ?3)", rusqlite::params![minute, id as i64, clicks(minute, id) as i64]).unwrap();
                conn.execute("INSERT INTO campaign_country_minute (minute, country, campaign_id, clicks) VALUES (?1, 'AU', ?2, ?3)", rusqlite::params![minute, id as i64, clicks(minute, id) as i64]).unwrap();
            }
        }
        drop(conn);
        let tier = StoreTier::open(&path).unwrap();
        let au = Some(Country::parse(b"AU").unwrap());
        for (from, to) in [(0, 1), (0, 64), (63, 65), (10, 300), (64, 128), (127, 129), (5, 5), (200, 250), (290, 400)] {
            let wanted: u64 = (from..to.min(300)).map(|m| clicks(m, 2)).sum();
            for country in [None, au] {
                assert_eq!(tier.count(Subject::Ad(2), from, to, country).unwrap(), wanted, "ad {from}..{to} {country:?}");
                assert_eq!(tier.count(Subject::Campaign(2), from, to, country).unwrap(), wanted, "campaign {from}..{to} {country:?}");
            }
        }
    }

    /// Every API query's plan uses an index or a primary key (no scan of a whole table), as
    /// SQLite's `EXPLAIN QUERY PLAN` reports it.
    #[test]
    fn every_api_query_uses_an_index() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        crate::storage::sqlite::serving::create_all(&conn).unwrap();
        for (sql, wanted) in QUERIES {
            let mut statement = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            // Parameters left unbound: the plan does not depend on their values.
            let mut rows = statement.raw_query();
            let mut plan = Vec::new();
            while let Some(row) = rows.next().unwrap() {
                plan.push(row.get::<_, String>(3).unwrap());
            }
            let plan = plan.join("; ");
            assert!(plan.contains(wanted), "{sql}\n  plan: {plan}\n  wanted: {wanted}");
            assert!(!plan.contains("SCAN"), "{sql} scans: {plan}");
        }
    }
}
