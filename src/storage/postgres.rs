//! `run --sink postgres://…`: the store's answers mirrored into PostgreSQL, exactly once, for the
//! dashboards and billing jobs that read a shared database rather than a file on our machine.
//!
//! The SQLite store stays the recovery log: it holds the checkpoints a restart resumes from, next
//! to the process. PostgreSQL gets the same answer tables, the changelog, the dead letters and the
//! partitions' progress, one transaction per watermark advance, and in that transaction the
//! frontier it now holds. Each advance commits to PostgreSQL first and to the store second, so
//! PostgreSQL is never behind the store. After a crash the replay re-sends what the store lacks;
//! PostgreSQL takes only the changes at or after its own frontier (every change carries its
//! logical time, and a replay reproduces the same changes at the same times), so nothing is
//! written twice even when the crash fell between the two commits.
//!
//! Rows go in with `COPY`: an advance at 200k clicks/s carries ~10^5 changelog rows, and a
//! statement per row would be a round trip per row. Answer changes are netted per key first (the
//! last value wins, or a delete), staged with one `COPY`, then merged with one `DELETE` and one
//! `INSERT` per table.
//!
//! Ids are `numeric(20)`, so an analyst sees the u64 the logs hold; counts and times are `bigint`.

use std::collections::HashMap;
use std::io::Write;

use postgres::{Client, NoTls};

use clickagg_dataflows::{Answer, Minute, Time, View};

use super::{AnswerRow, Batch, CommitStore, Committed, ANSWER_TABLES, SCHEMA_VERSION};
use crate::model::AnswerSettings;
use crate::output::changelog_fields;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS clickagg_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS ad_minute (minute bigint NOT NULL, ad_id numeric(20) NOT NULL, clicks bigint NOT NULL,
    PRIMARY KEY (minute, ad_id));
CREATE TABLE IF NOT EXISTS campaign_minute (minute bigint NOT NULL, campaign_id numeric(20) NOT NULL, clicks bigint NOT NULL,
    PRIMARY KEY (minute, campaign_id));
CREATE TABLE IF NOT EXISTS country_minute (minute bigint NOT NULL, country text NOT NULL, ad_id numeric(20) NOT NULL,
    clicks bigint NOT NULL, PRIMARY KEY (minute, country, ad_id));
CREATE TABLE IF NOT EXISTS top_minute (minute bigint NOT NULL, ad_id numeric(20) NOT NULL, clicks bigint NOT NULL,
    PRIMARY KEY (minute, ad_id));
CREATE TABLE IF NOT EXISTS fraud_minute (minute bigint NOT NULL, ad_id numeric(20) NOT NULL, excluded_clicks bigint NOT NULL,
    PRIMARY KEY (minute, ad_id));
CREATE TABLE IF NOT EXISTS top_window (window_minutes integer NOT NULL, as_of bigint NOT NULL, ad_id numeric(20) NOT NULL,
    clicks bigint NOT NULL, PRIMARY KEY (window_minutes, as_of, ad_id));
CREATE TABLE IF NOT EXISTS changelog (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, time bigint NOT NULL,
    view text NOT NULL, key text NOT NULL, value bigint NOT NULL, diff bigint NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letter (partition text NOT NULL, \"offset\" bigint NOT NULL, reason text NOT NULL,
    line bytea NOT NULL, time bigint NOT NULL, PRIMARY KEY (partition, \"offset\"));
CREATE TABLE IF NOT EXISTS partitions (name text PRIMARY KEY, \"offset\" bigint NOT NULL, max_ts bigint, lines bigint NOT NULL,
    accepted bigint NOT NULL, late bigint NOT NULL, too_late bigint NOT NULL, malformed bigint NOT NULL);
CREATE TABLE IF NOT EXISTS commits (frontier bigint PRIMARY KEY, committed_at_ms bigint NOT NULL, changes bigint NOT NULL);
";

/// Staging tables, private to the connection and emptied by each commit.
const STAGING: &str = "
CREATE TEMP TABLE stage_answer (tbl smallint NOT NULL, minute bigint NOT NULL, country text NOT NULL,
    id numeric(20) NOT NULL, clicks bigint) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE stage_window (window_minutes integer NOT NULL, as_of bigint NOT NULL, ad_id numeric(20) NOT NULL,
    clicks bigint NOT NULL) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE stage_dead (partition text NOT NULL, \"offset\" bigint NOT NULL, reason text NOT NULL, line bytea NOT NULL,
    time bigint NOT NULL) ON COMMIT DELETE ROWS;
";

/// Taken for the connection's life: two runs mirroring into one database would interleave
/// their advances. (An arbitrary constant: "clickagg" in ASCII.)
const WRITER_LOCK: i64 = 0x636c_6963_6b61_6767;
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct PostgresSink {
    client: Client,
    /// Where, for messages: the URL without its password.
    place: String,
    /// Every change before this time is in PostgreSQL.
    frontier: Option<Time>,
}

/// What the mirror checks of the store it mirrors.
pub struct MirroredStore {
    pub id: String,
    pub committed: Option<Committed>,
}

impl PostgresSink {
    /// Connects, creates the tables when missing, and checks that the database mirrors `store`:
    /// written by it alone, under the same settings, and holding at least what it committed.
    /// Nothing is written when it refuses.
    pub fn connect(url: &str, settings: &AnswerSettings, store: &MirroredStore) -> Result<PostgresSink, String> {
        let mut config: postgres::Config = url.parse().map_err(|e| format!("--sink {}: {e}", redact(url)))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(std::time::Duration::from_secs(10));
        }
        config.application_name("clickagg");
        let place = redact(url);
        let err = |e: postgres::Error| format!("PostgreSQL sink {place}: {}", describe(&e));
        let mut client = config.connect(NoTls).map_err(err)?;
        // A writer killed a moment ago holds the lock until its server process notices the
        // closed connection: wait a little before calling the database taken.
        let waiting_since = std::time::Instant::now();
        while !client.query_one("SELECT pg_try_advisory_lock($1)", &[&WRITER_LOCK]).map_err(err)?.get::<_, bool>(0) {
            if waiting_since.elapsed() > LOCK_WAIT {
                return Err(format!(
                    "PostgreSQL sink {place}: another clickagg is writing to this database (waited {}); one writer at a time",
                    humantime::format_duration(LOCK_WAIT)
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let mut tx = client.transaction().map_err(err)?;
        tx.batch_execute(SCHEMA).map_err(err)?;
        let meta = |tx: &mut postgres::Transaction<'_>, key: &str| -> Result<Option<String>, String> {
            Ok(tx.query_opt("SELECT value FROM clickagg_meta WHERE key = $1", &[&key]).map_err(err)?.map(|r| r.get(0)))
        };
        match meta(&mut tx, "schema_version")? {
            Some(v) if v == SCHEMA_VERSION.to_string() => {}
            Some(v) => return Err(format!("PostgreSQL sink {place}: its tables are schema version {v}; this clickagg writes {SCHEMA_VERSION}")),
            None => {}
        }
        if let Some(text) = meta(&mut tx, "settings")? {
            let theirs = AnswerSettings::parse(&text).map_err(|e| format!("PostgreSQL sink {place}: {e}"))?;
            if theirs != *settings {
                return Err(format!(
                    "PostgreSQL sink {place} holds answers written with other settings; mirroring would mix two sets of answers:\n{}",
                    theirs.differences("in the database", settings, "now")
                ));
            }
        }
        let frontier = match meta(&mut tx, "frontier")? {
            None => None,
            Some(text) => Some(text.parse::<Time>().map_err(|_| format!("PostgreSQL sink {place}: frontier {text} is not a number"))?),
        };
        // The database mirrors one store: its frontier may be ahead of that store's (a crash
        // between the two commits), never behind it.
        let store_frontier = store.committed.as_ref().map(|c| c.frontier);
        match meta(&mut tx, "store_id")? {
            Some(theirs) if theirs != store.id => {
                return Err(format!(
                    "PostgreSQL sink {place} holds the answers of another store (id {theirs}; this store is {}): use a \
                     new database (or schema), or resume with the store that wrote it",
                    store.id
                ))
            }
            _ if store_frontier.is_some_and(|s| frontier.is_none_or(|m| m < s)) => {
                return Err(format!(
                    "PostgreSQL sink {place} is behind the store (it holds answers before watermark {}, the store before \
                     {}): a resumed run cannot re-send what the store committed; start the store and the database anew",
                    frontier.map_or("none".into(), |m| m.to_string()),
                    store_frontier.unwrap_or_default()
                ))
            }
            _ => {}
        }
        tx.execute(
            "INSERT INTO clickagg_meta (key, value) VALUES ('schema_version', $1), ('settings', $2),
             ('clickagg_version', $3), ('store_id', $4) ON CONFLICT (key) DO NOTHING",
            &[&SCHEMA_VERSION.to_string(), &settings.to_json(), &env!("CARGO_PKG_VERSION"), &store.id],
        )
        .map_err(err)?;
        tx.commit().map_err(err)?;
        client.batch_execute(STAGING).map_err(err)?;
        Ok(PostgresSink { client, place, frontier })
    }

}

impl CommitStore for PostgresSink {
    /// Commits what of `batch` PostgreSQL does not hold yet, and `frontier` (`None`: the end of
    /// the input), in one transaction. Returns whether there was anything to commit.
    fn commit(&mut self, frontier: Option<Time>, batch: &Batch) -> Result<bool, String> {
        let place = self.place.clone();
        let err = |e: postgres::Error| format!("PostgreSQL sink {place}: {}", describe(&e));
        let copy_failed = |e: String| format!("PostgreSQL sink {place}: {e}");
        let frontier_value = frontier.unwrap_or(Time::MAX);
        let holds_before = self.frontier.unwrap_or(0);
        // During recovery the replay re-sends changes PostgreSQL committed before a crash.
        let changes: Vec<&(Time, Answer, isize)> = batch.changes.iter().filter(|(t, _, _)| *t >= holds_before).collect();
        let advances = self.frontier.is_none_or(|f| frontier_value > f);
        if !advances && changes.is_empty() && batch.snapshots.is_empty() && batch.dead_letters.is_empty() && batch.progress.is_empty() {
            return Ok(false);
        }
        let mut tx = self.client.transaction().map_err(err)?;

        if !changes.is_empty() {
            let mut buffer = Vec::with_capacity(64 * changes.len());
            let mut key = String::new();
            for (time, answer, diff) in &changes {
                let (view, value) = changelog_fields(answer, &mut key);
                let _ = writeln!(buffer, "{time}\t{view}\t{}\t{value}\t{diff}", escape(&key));
            }
            copy_rows(&mut tx, "COPY changelog (time, view, key, value, diff) FROM STDIN", &buffer).map_err(copy_failed)?;

            // Net effect per answer row, applied in the store's order: time by time, retractions first.
            let mut net: HashMap<(usize, Minute, u16, u64), (AnswerRow, bool)> = HashMap::with_capacity(changes.len());
            for at_one_time in changes.chunk_by(|a, b| a.0 == b.0) {
                for positive in [false, true] {
                    for (_, answer, diff) in at_one_time.iter().filter(|c| (c.2 > 0) == positive) {
                        if let Some(row) = AnswerRow::of(answer) {
                            net.insert(row.key(), (row, *diff > 0));
                        }
                    }
                }
            }
            buffer.clear();
            for &(AnswerRow { table, minute, country, id, clicks }, present) in net.values() {
                // Country codes print as letters: nothing to escape.
                let country = country.map(|c| c.to_string()).unwrap_or_default();
                let _ = if present {
                    writeln!(buffer, "{table}\t{minute}\t{country}\t{id}\t{clicks}")
                } else {
                    writeln!(buffer, "{table}\t{minute}\t{country}\t{id}\t\\N")
                };
            }
            copy_rows(&mut tx, "COPY stage_answer (tbl, minute, country, id, clicks) FROM STDIN", &buffer).map_err(copy_failed)?;
            for (tbl, (view, table, id, clicks)) in ANSWER_TABLES.iter().enumerate() {
                let country = if *view == View::CountryMinute { " AND t.country = s.country" } else { "" };
                let country_column = if *view == View::CountryMinute { "country, " } else { "" };
                tx.batch_execute(&format!(
                    "DELETE FROM {table} t USING stage_answer s WHERE s.tbl = {tbl} AND t.minute = s.minute{country} AND t.{id} = s.id;
                     INSERT INTO {table} (minute, {country_column}{id}, {clicks})
                       SELECT minute, {country_column}id, clicks FROM stage_answer WHERE tbl = {tbl} AND clicks IS NOT NULL;"
                ))
                .map_err(err)?;
            }
        }

        if !batch.snapshots.is_empty() {
            let mut buffer = Vec::new();
            for (boundary, members) in &batch.snapshots {
                for (window, ad, clicks) in members {
                    let _ = writeln!(buffer, "{window}\t{boundary}\t{ad}\t{clicks}");
                }
            }
            copy_rows(&mut tx, "COPY stage_window (window_minutes, as_of, ad_id, clicks) FROM STDIN", &buffer).map_err(copy_failed)?;
            tx.batch_execute(
                "INSERT INTO top_window SELECT * FROM stage_window
                 ON CONFLICT (window_minutes, as_of, ad_id) DO UPDATE SET clicks = excluded.clicks",
            )
            .map_err(err)?;
        }

        if !batch.dead_letters.is_empty() {
            let mut buffer = Vec::new();
            for (time, letter) in &batch.dead_letters {
                let name = batch.partition_names.get(letter.partition as usize).map_or("?", String::as_str);
                let _ = write!(buffer, "{}\t{}\t{}\t\\\\x", escape(name), letter.offset, letter.reason.as_str());
                for byte in &letter.line {
                    let _ = write!(buffer, "{byte:02x}");
                }
                let _ = writeln!(buffer, "\t{time}");
            }
            copy_rows(&mut tx, "COPY stage_dead (partition, \"offset\", reason, line, time) FROM STDIN", &buffer).map_err(copy_failed)?;
            tx.batch_execute("INSERT INTO dead_letter SELECT * FROM stage_dead ON CONFLICT DO NOTHING").map_err(err)?;
        }

        let progress = tx
            .prepare(
                "INSERT INTO partitions (name, \"offset\", max_ts, lines, accepted, late, too_late, malformed)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (name) DO UPDATE SET \"offset\" = excluded.\"offset\", max_ts = excluded.max_ts,
                   lines = excluded.lines, accepted = excluded.accepted, late = excluded.late,
                   too_late = excluded.too_late, malformed = excluded.malformed
                 WHERE excluded.\"offset\" >= partitions.\"offset\"",
            )
            .map_err(err)?;
        for (name, p) in &batch.progress {
            let max_ts = p.max_ts.map(|t| t as i64);
            let [lines, accepted, late, too_late, malformed] = [p.lines, p.accepted, p.late, p.too_late, p.malformed].map(|c| c as i64);
            tx.execute(&progress, &[name, &(p.offset as i64), &max_ts, &lines, &accepted, &late, &too_late, &malformed])
                .map_err(err)?;
        }

        let set = |tx: &mut postgres::Transaction<'_>, key: &str, value: String| {
            tx.execute(
                "INSERT INTO clickagg_meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&key, &value],
            )
            .map(|_| ())
            .map_err(err)
        };
        if advances {
            set(&mut tx, "frontier", frontier_value.to_string())?;
            let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
            tx.execute(
                "INSERT INTO commits (frontier, committed_at_ms, changes) VALUES ($1, $2, $3)
                 ON CONFLICT (frontier) DO UPDATE SET committed_at_ms = excluded.committed_at_ms, changes = excluded.changes",
                &[&(frontier_value as i64), &now_ms, &(changes.len() as i64)],
            )
            .map_err(err)?;
        }
        if let Some(boundary) = batch.next_boundary {
            set(&mut tx, "next_boundary", boundary.to_string())?;
        }
        if let Some(minute) = batch.last_minute {
            set(&mut tx, "last_minute", minute.to_string())?;
        }
        if frontier.is_none() {
            set(&mut tx, "complete", "1".into())?;
        }
        tx.commit().map_err(err)?;
        if advances {
            self.frontier = Some(frontier_value);
        }
        Ok(true)
    }
}

/// Sends `rows`, in COPY's text format, with the `COPY … FROM STDIN` statement `copy`. An error
/// leaves the transaction to be rolled back.
fn copy_rows(tx: &mut postgres::Transaction<'_>, copy: &str, rows: &[u8]) -> Result<(), String> {
    let mut writer = tx.copy_in(copy).map_err(|e| describe(&e))?;
    writer.write_all(rows).map_err(|e| e.to_string())?;
    writer.finish().map(|_| ()).map_err(|e| describe(&e))
}

/// A value for COPY's text format: backslash, tab, newline and carriage return escaped.
fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.bytes().any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r')) {
        return text.into();
    }
    text.replace('\\', "\\\\").replace('\t', "\\t").replace('\n', "\\n").replace('\r', "\\r").into()
}

/// The URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &userinfo[..colon], &url[at..]),
                None => url.to_string(),
            }
        }
        // The key=value form: `host=db user=bill password=…`.
        _ => url
            .split(' ')
            .map(|part| if part.starts_with("password=") { "password=***" } else { part })
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// The server's own message when there is one (the driver's Display says only "db error").
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_messages() {
        assert_eq!(redact("postgres://bill:s3cret@db:5432/clicks"), "postgres://bill:***@db:5432/clicks");
        assert_eq!(redact("postgres://bill@db/clicks"), "postgres://bill@db/clicks");
        assert_eq!(redact("host=db user=bill password=s3cret"), "host=db user=bill password=***");
    }

    #[test]
    fn copy_text_is_escaped() {
        assert_eq!(escape("plain"), "plain");
        assert_eq!(escape("a\tb\\c\nd"), "a\\tb\\\\c\\nd");
    }
}
