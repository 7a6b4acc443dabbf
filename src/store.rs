//! The durable sink (DESIGN "Exactly once"): an embedded SQLite database that holds the answers
//! of SPEC §4 as tables, the changelog, the dead letters, and per partition the progress and the
//! checkpoints that recovery restarts from; all of one watermark advance in one transaction.
//!
//! Why SQLite: one file any tool can open (`sqlite3 store.db 'select …'`), transactions that
//! survive `kill -9` (write-ahead log, `synchronous=FULL`), a bundled build with no system
//! dependency, and SQL for the reconciliation and the analysts. redb or fjall would be faster
//! key-value stores, but every reader would need our code to look inside.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use clickagg_dataflows::hashing::FastHasher;
use clickagg_dataflows::{Answer, DeadLetter, Minute, PartitionProgress, Time, View};

use crate::sink::{changelog_fields, write_quoted, write_ranked, Summary, WindowSnapshot};

/// Bumped when the tables change; a store of another version is refused with a clear error.
pub const SCHEMA_VERSION: u32 = 1;

/// Held while a transaction commits: a clean shutdown takes it, so the process never exits
/// half-way through a commit (SQLite would roll that back anyway; this keeps the exit message true).
pub static COMMIT_LOCK: Mutex<()> = Mutex::new(());

const SCHEMA: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE ad_minute (minute INTEGER NOT NULL, ad_id INTEGER NOT NULL, clicks INTEGER NOT NULL,
    PRIMARY KEY (minute, ad_id)) WITHOUT ROWID;
CREATE TABLE campaign_minute (minute INTEGER NOT NULL, campaign_id INTEGER NOT NULL, clicks INTEGER NOT NULL,
    PRIMARY KEY (minute, campaign_id)) WITHOUT ROWID;
CREATE TABLE country_minute (minute INTEGER NOT NULL, country TEXT NOT NULL, ad_id INTEGER NOT NULL, clicks INTEGER NOT NULL,
    PRIMARY KEY (minute, country, ad_id)) WITHOUT ROWID;
CREATE TABLE top_minute (minute INTEGER NOT NULL, ad_id INTEGER NOT NULL, clicks INTEGER NOT NULL,
    PRIMARY KEY (minute, ad_id)) WITHOUT ROWID;
CREATE TABLE fraud_minute (minute INTEGER NOT NULL, ad_id INTEGER NOT NULL, excluded_clicks INTEGER NOT NULL,
    PRIMARY KEY (minute, ad_id)) WITHOUT ROWID;
CREATE TABLE top_window (window_minutes INTEGER NOT NULL, as_of INTEGER NOT NULL, ad_id INTEGER NOT NULL, clicks INTEGER NOT NULL,
    PRIMARY KEY (window_minutes, as_of, ad_id)) WITHOUT ROWID;
CREATE TABLE changelog (seq INTEGER PRIMARY KEY, time INTEGER NOT NULL, view TEXT NOT NULL, key TEXT NOT NULL,
    value INTEGER NOT NULL, diff INTEGER NOT NULL);
CREATE TABLE dead_letter (partition TEXT NOT NULL, offset INTEGER NOT NULL, reason TEXT NOT NULL, line BLOB NOT NULL,
    time INTEGER NOT NULL, PRIMARY KEY (partition, offset)) WITHOUT ROWID;
CREATE TABLE partitions (name TEXT PRIMARY KEY, offset INTEGER NOT NULL, max_ts INTEGER, lines INTEGER NOT NULL,
    accepted INTEGER NOT NULL, late INTEGER NOT NULL, too_late INTEGER NOT NULL, malformed INTEGER NOT NULL,
    head_hash INTEGER NOT NULL);
CREATE TABLE checkpoints (partition TEXT NOT NULL, minute INTEGER NOT NULL, offset INTEGER NOT NULL, max_ts INTEGER NOT NULL,
    lines INTEGER NOT NULL, accepted INTEGER NOT NULL, late INTEGER NOT NULL, too_late INTEGER NOT NULL,
    malformed INTEGER NOT NULL, PRIMARY KEY (partition, minute)) WITHOUT ROWID;
CREATE TABLE commits (frontier INTEGER PRIMARY KEY, committed_at_ms INTEGER NOT NULL, changes INTEGER NOT NULL);
";

/// Everything one watermark advance commits.
#[derive(Default)]
pub struct Batch {
    /// Answer changes, in the order the sink applied them (the changelog's order).
    pub changes: Vec<(Time, Answer, isize)>,
    /// Window snapshots: `(boundary, [(window, ad, clicks)])`.
    pub snapshots: Vec<WindowSnapshot>,
    pub dead_letters: Vec<(Time, DeadLetter)>,
    /// The latest progress of each partition, by name.
    pub progress: BTreeMap<String, PartitionProgress>,
    pub next_boundary: Option<Minute>,
    pub last_minute: Option<Minute>,
    /// Partition names by the ids the dataflow uses; kept across commits.
    pub partition_names: Vec<String>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.snapshots.is_empty() && self.dead_letters.is_empty() && self.progress.is_empty()
    }
}

/// Where a store left off: what recovery needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Committed {
    /// Every update before this time is committed.
    pub frontier: Time,
    pub next_boundary: Option<Minute>,
    pub last_minute: Option<Minute>,
}

/// A place to restart one partition from: every row before `progress.offset` has a ts at most
/// `progress.max_ts`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub progress: PartitionProgress,
}

pub struct Store {
    conn: Connection,
    path: PathBuf,
    /// The frontier of the last commit; commits never move it back.
    frontier: Option<Time>,
    /// How many bytes of each partition's beginning its `head_hash` covers.
    head_hashes: BTreeMap<String, u64>,
}

/// A read-write connection in the mode every commit relies on: write-ahead log, and a sync of
/// each transaction before it counts as committed.
fn open_writable(path: &Path, create: bool) -> Result<Connection, String> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let conn = Connection::open_with_flags(path, flags).map_err(|e| sql_error(path, e))?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| sql_error(path, e))?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(|e| sql_error(path, e))?;
    // Each commit updates answers all over the per-minute tables; with SQLite's default 2 MB
    // page cache every update walked down B-tree pages read again from the OS.
    conn.pragma_update(None, "cache_size", -256 * 1024).map_err(|e| sql_error(path, e))?;
    Ok(conn)
}

fn sql_error(path: &Path, e: rusqlite::Error) -> String {
    format!("store {}: {e}", path.display())
}

/// The first bytes of a partition hashed, to tell at a restart that the file is still the one
/// the store read (a replaced file fails this even when it is longer).
pub fn head_hash(path: &Path, len: u64) -> io::Result<u64> {
    use std::io::Read;
    let mut head = Vec::new();
    std::fs::File::open(path)?.take(len.min(4096)).read_to_end(&mut head)?;
    Ok(xxhash_rust::xxh3::xxh3_64(&head))
}

impl Store {
    /// Opens the store at `path`, or creates it when nothing is there. `settings` are the
    /// settings that change answers: a store written under other settings is refused, as is a
    /// file that is not a store of this version, and such a file is never written to.
    /// Returns what was committed before, if anything.
    /// `paths` are the partition files now in the log directory: each one the store has read must
    /// still be the file it read.
    pub fn open(path: &Path, settings: &str, logs: &Path, paths: &[PathBuf]) -> Result<(Store, Option<Committed>), String> {
        let exists = path.exists();
        if !exists {
            let mut wal = path.as_os_str().to_owned();
            wal.push("-wal");
            if Path::new(&wal).exists() {
                return Err(format!(
                    "the store {} is missing but its write-ahead log {} is there: the store was moved or deleted \
                     part-way; restore it, or remove the log to start a new store",
                    path.display(),
                    Path::new(&wal).display()
                ));
            }
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            }
        }
        if exists {
            // Everything that can refuse the store is checked through a read-only connection:
            // a read-write one would fold the write-ahead log into the file when it closes, so
            // even a refused store would change on disk.
            let existing = Store::open_read_only(path)?;
            let stored_settings = existing.settings()?;
            if stored_settings != settings {
                return Err(format!(
                    "the store {} was written with other settings; resuming would mix two sets of answers.\n  store: {stored_settings}\n  now:   {settings}",
                    path.display()
                ));
            }
            if existing.meta("complete")?.is_some() {
                return Err(format!(
                    "the store {} holds a finished replay (the end of the logs was committed); export it with \
                     `clickagg export`, or start a new store",
                    path.display()
                ));
            }
            existing.check_partitions(paths)?;
        }
        let conn = open_writable(path, !exists)?;
        let mut store = Store { conn, path: path.to_path_buf(), frontier: None, head_hashes: BTreeMap::new() };
        if !exists {
            store.conn.execute_batch(SCHEMA).map_err(|e| sql_error(path, e))?;
            store.set_meta("schema_version", &SCHEMA_VERSION.to_string())?;
            store.set_meta("clickagg_version", env!("CARGO_PKG_VERSION"))?;
            store.set_meta("settings", settings)?;
            store.set_meta("logs", &logs.display().to_string())?;
            store.set_meta("store_id", &new_store_id())?;
            return Ok((store, None));
        }
        if store.meta("store_id")?.is_none() {
            store.set_meta("store_id", &new_store_id())?;
        }
        let committed = store.committed()?;
        store.frontier = committed.as_ref().map(|c| c.frontier);
        let mut statement = store.conn.prepare("SELECT name, offset FROM partitions").map_err(|e| sql_error(path, e))?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| sql_error(path, e))?;
        drop(statement);
        for (name, offset) in rows {
            store.head_hashes.insert(name, offset.min(4096));
        }
        Ok((store, committed))
    }

    /// Opens an existing store to read it (export, reconcile).
    pub fn open_read_only(path: &Path) -> Result<Store, String> {
        if !path.exists() {
            return Err(format!("there is no store at {}", path.display()));
        }
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| sql_error(path, e))?;
        let store = Store { conn, path: path.to_path_buf(), frontier: None, head_hashes: BTreeMap::new() };
        let not_a_store = |why: String| format!("{} is not a clickagg store ({why}); it was left as it is", path.display());
        // Reading the schema fails on a file that is not SQLite, or one cut short.
        let tables: i64 = store
            .conn
            .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'", [], |r| r.get(0))
            .map_err(|e| not_a_store(e.to_string()))?;
        if tables == 0 {
            return Err(not_a_store("an SQLite database without clickagg's tables".into()));
        }
        match store.meta("schema_version").map_err(not_a_store)? {
            Some(v) if v == SCHEMA_VERSION.to_string() => {}
            Some(found) => {
                return Err(crate::error::EdgeError::StoreVersion {
                    path: path.to_path_buf(),
                    found,
                    ours: env!("CARGO_PKG_VERSION"),
                    reads: SCHEMA_VERSION,
                }
                .into())
            }
            None => return Err(not_a_store("no schema version".into())),
        }
        check_length(path)?;
        Ok(store)
    }

    /// Opens an existing store to write reconciled answers into it (`reconcile --apply`).
    pub fn open_to_apply(path: &Path) -> Result<Store, String> {
        drop(Store::open_read_only(path)?);
        let conn = open_writable(path, false)?;
        // A follower committing at the same time holds the write lock for a moment at a time.
        conn.busy_timeout(std::time::Duration::from_secs(30)).map_err(|e| sql_error(path, e))?;
        Ok(Store { conn, path: path.to_path_buf(), frontier: None, head_hashes: BTreeMap::new() })
    }

    /// The store's identity, random at its creation: a mirror database records the store it
    /// mirrors, and refuses another.
    pub fn id(&self) -> Result<String, String> {
        self.meta("store_id")?.ok_or_else(|| format!("store {}: no store_id", self.path.display()))
    }

    /// The settings the store was written with.
    pub fn settings(&self) -> Result<String, String> {
        Ok(self.meta("settings")?.unwrap_or_default())
    }

    /// Minutes before this one are final in the store (no later commit can change them); `None`
    /// when the store holds a finished replay, whose every minute is final.
    pub fn final_minutes_before(&self, rules: &clickagg_dataflows::EventTimeRules) -> Result<Option<Minute>, String> {
        if self.meta("complete")?.is_some() {
            return Ok(None);
        }
        Ok(Some(self.committed()?.map_or(0, |c| rules.final_minutes_before(c.frontier))))
    }

    /// The committed per-minute answers whose minute is `in_range`, keyed as reconcile compares them.
    pub fn answers(&self, in_range: impl Fn(Minute) -> bool) -> Result<crate::reconcile::Answers, String> {
        use crate::reconcile::AnswerKey;
        let err = |e: rusqlite::Error| sql_error(&self.path, e);
        let mut answers = crate::reconcile::Answers::new();
        for (view, sql) in [
            (View::AdMinute, "SELECT minute, '', ad_id, clicks FROM ad_minute"),
            (View::CampaignMinute, "SELECT minute, '', campaign_id, clicks FROM campaign_minute"),
            (View::CountryMinute, "SELECT minute, country, ad_id, clicks FROM country_minute"),
            (View::TopMinute, "SELECT minute, '', ad_id, clicks FROM top_minute"),
            (View::FraudMinute, "SELECT minute, '', ad_id, excluded_clicks FROM fraud_minute"),
        ] {
            let mut statement = self.conn.prepare(sql).map_err(err)?;
            let mut rows = statement.query([]).map_err(err)?;
            while let Some(row) = rows.next().map_err(err)? {
                let minute = row.get::<_, i64>(0).map_err(err)? as Minute;
                if in_range(minute) {
                    let country: String = row.get(1).map_err(err)?;
                    let country = clickagg_dataflows::Country::parse(country.as_bytes()).map_or(0, |c| c.0);
                    // Ids are stored as the i64 bit patterns of u64s.
                    let id = row.get::<_, i64>(2).map_err(err)? as u64;
                    answers.push((AnswerKey { view, minute, country, id }, row.get::<_, i64>(3).map_err(err)? as u64));
                }
            }
        }
        answers.sort_unstable();
        Ok(answers)
    }

    /// Writes reconciled answers as a new version: each `(answer, old, new)` replaces the
    /// committed row, the old values are kept in `superseded`, and `reconciliations` gets an
    /// audit row; all in one transaction. Returns how many answers changed.
    pub fn apply_reconciliation(
        &mut self,
        corrections: &[(crate::reconcile::AnswerKey, u64, u64)],
        range: (Minute, Minute),
        logs: &Path,
    ) -> Result<u64, String> {
        let path = self.path.clone();
        let err = |e: rusqlite::Error| sql_error(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        tx.execute_batch(
            "CREATE TABLE IF NOT EXISTS reconciliations (version INTEGER PRIMARY KEY, applied_at_ms INTEGER NOT NULL,
                 from_minute INTEGER NOT NULL, to_minute INTEGER NOT NULL, logs TEXT NOT NULL,
                 answers_changed INTEGER NOT NULL, clicks_added INTEGER NOT NULL);
             CREATE TABLE IF NOT EXISTS superseded (version INTEGER NOT NULL, view TEXT NOT NULL, minute INTEGER NOT NULL,
                 key TEXT NOT NULL, clicks INTEGER NOT NULL, reconciled_clicks INTEGER NOT NULL,
                 PRIMARY KEY (version, view, minute, key)) WITHOUT ROWID;",
        )
        .map_err(err)?;
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let clicks_added: i64 =
            corrections.iter().filter(|c| c.0.view == View::AdMinute).map(|c| c.2 as i64 - c.1 as i64).sum();
        tx.execute(
            "INSERT INTO reconciliations (applied_at_ms, from_minute, to_minute, logs, answers_changed, clicks_added)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![now_ms, range.0 as i64, range.1 as i64, logs.display().to_string(), corrections.len() as i64, clicks_added],
        )
        .map_err(err)?;
        let version = tx.last_insert_rowid();
        let mut rows = AnswerRows::new(&tx).map_err(err)?;
        for (key, old, new) in corrections {
            tx.execute(
                "INSERT INTO superseded (version, view, minute, key, clicks, reconciled_clicks) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![version, key.view_name(), key.minute, key.key_text(), *old as i64, *new as i64],
            )
            .map_err(err)?;
            // An absent answer is a count of 0: no row to take out, or none to put in.
            if *old > 0 {
                rows.apply(&key.answer(*old), false).map_err(err)?;
            }
            if *new > 0 {
                rows.apply(&key.answer(*new), true).map_err(err)?;
            }
        }
        rows.finish().map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(corrections.len() as u64)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn meta(&self, key: &str) -> Result<Option<String>, String> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| sql_error(&self.path, e))
    }

    fn set_meta(&self, key: &str, value: &str) -> Result<(), String> {
        self.conn
            .execute("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value", [key, value])
            .map(|_| ())
            .map_err(|e| sql_error(&self.path, e))
    }

    /// Whether the store holds a finished replay (the end of the logs was committed).
    pub fn is_complete(&self) -> Result<bool, String> {
        Ok(self.meta("complete")?.is_some())
    }

    /// What the last commit left, if anything was committed.
    pub fn committed(&self) -> Result<Option<Committed>, String> {
        let number = |key: &str| -> Result<Option<u64>, String> {
            match self.meta(key)? {
                None => Ok(None),
                Some(text) => text.parse().map(Some).map_err(|_| format!("store {}: meta {key} is not a number: {text}", self.path.display())),
            }
        };
        let Some(frontier) = number("frontier")? else { return Ok(None) };
        Ok(Some(Committed {
            frontier,
            next_boundary: number("next_boundary")?.map(|m| m as Minute),
            last_minute: number("last_minute")?.map(|m| m as Minute),
        }))
    }

    /// The latest checkpoint of `partition` from which every row with a ts at or after
    /// `live_from_ms` is still ahead; `None`: start from the beginning.
    pub fn checkpoint_before(&self, partition: &str, live_from_ms: u64) -> Result<Option<Checkpoint>, String> {
        self.conn
            .query_row(
                "SELECT offset, max_ts, lines, accepted, late, too_late, malformed FROM checkpoints
                 WHERE partition = ?1 AND max_ts < ?2 ORDER BY offset DESC LIMIT 1",
                params![partition, live_from_ms as i64],
                |r| {
                    Ok(Checkpoint {
                        progress: PartitionProgress {
                            partition: 0,
                            offset: r.get::<_, i64>(0)? as u64,
                            max_ts: Some(r.get::<_, i64>(1)? as u64),
                            lines: r.get::<_, i64>(2)? as u64,
                            accepted: r.get::<_, i64>(3)? as u64,
                            late: r.get::<_, i64>(4)? as u64,
                            too_late: r.get::<_, i64>(5)? as u64,
                            malformed: r.get::<_, i64>(6)? as u64,
                            finished: false,
                            // The source takes the hash again when it opens the file here.
                            head_hash: 0,
                        },
                    })
                },
            )
            .optional()
            .map_err(|e| sql_error(&self.path, e))
    }

    /// Checks that each partition the store has read is still the file it read: at least as
    /// long as the committed offset, and with the same first bytes. A log truncated or replaced
    /// under the store cannot be resumed without counting or losing clicks.
    pub fn check_partitions(&self, paths: &[PathBuf]) -> Result<(), String> {
        let mut statement = self
            .conn
            .prepare("SELECT name, offset, head_hash FROM partitions")
            .map_err(|e| sql_error(&self.path, e))?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64, r.get::<_, i64>(2)? as u64)))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| sql_error(&self.path, e))?;
        for (name, offset, hash) in rows {
            let Some(path) = paths.iter().find(|p| crate::source::partition_name(p) == name) else {
                return Err(format!(
                    "partition {name} was read into the store {} but is no longer in the log directory: \
                     its clicks cannot be rebuilt; restore the file or start a new store",
                    self.path.display()
                ));
            };
            let len = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?.len();
            if len < offset {
                return Err(format!(
                    "partition {name} is {len} bytes but the store {} committed reading {offset}: it was truncated \
                     or replaced, and resuming would count or lose clicks",
                    self.path.display()
                ));
            }
            let now = head_hash(path, offset).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if now as i64 != hash as i64 {
                return Err(format!(
                    "partition {name} does not begin with the bytes the store {} read: it was replaced; \
                     resuming would count or lose clicks",
                    self.path.display()
                ));
            }
        }
        Ok(())
    }

    /// Commits `batch` and the frontier in one transaction. `frontier: None` is the end of the
    /// input (replay): the store is then complete. A frontier behind the committed one (during
    /// recovery) commits nothing.
    pub fn commit(&mut self, frontier: Option<Time>, batch: &mut Batch) -> Result<(), String> {
        let frontier_value = frontier.unwrap_or(Time::MAX);
        if self.frontier.is_some_and(|f| frontier_value <= f) && batch.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let err = |e: rusqlite::Error| sql_error(&path, e);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(err)?;
        {
            insert_changelog(&tx, &batch.changes).map_err(err)?;
            // Time by time, retractions first: within one time a changed answer is `-old`,
            // `+new` of one key, and the insertion replaces the row, so only retractions of
            // keys with no insertion at that time are deletes.
            let mut rows = AnswerRows::new(&tx).map_err(err)?;
            let mut inserted: std::collections::HashSet<_, std::hash::BuildHasherDefault<FastHasher>> = Default::default();
            for at_one_time in batch.changes.chunk_by(|a, b| a.0 == b.0) {
                inserted.clear();
                inserted.extend(at_one_time.iter().filter(|c| c.2 > 0).filter_map(|c| AnswerRow::of(&c.1)).map(|r| r.key()));
                for (_, answer, diff) in at_one_time {
                    if *diff < 0 && !AnswerRow::of(answer).is_some_and(|r| inserted.contains(&r.key())) {
                        rows.apply(answer, false).map_err(err)?;
                    }
                }
                for (_, answer, diff) in at_one_time {
                    if *diff > 0 {
                        rows.apply(answer, true).map_err(err)?;
                    }
                }
            }
            rows.finish().map_err(err)?;
            let mut snapshot = tx
                .prepare_cached("INSERT OR REPLACE INTO top_window (window_minutes, as_of, ad_id, clicks) VALUES (?1, ?2, ?3, ?4)")
                .map_err(err)?;
            for (boundary, members) in &batch.snapshots {
                for &(window, ad, clicks) in members {
                    snapshot.execute(params![window, boundary, ad as i64, clicks as i64]).map_err(err)?;
                }
            }
            let mut dead = tx
                .prepare_cached("INSERT OR IGNORE INTO dead_letter (partition, offset, reason, line, time) VALUES (?1, ?2, ?3, ?4, ?5)")
                .map_err(err)?;
            for (time, letter) in &batch.dead_letters {
                let name = batch_partition_name(batch, letter.partition);
                dead.execute(params![name, letter.offset as i64, letter.reason.as_str(), letter.line, *time as i64]).map_err(err)?;
            }
            let mut progress = tx
                .prepare_cached(
                    "INSERT INTO partitions (name, offset, max_ts, lines, accepted, late, too_late, malformed, head_hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT (name) DO UPDATE SET offset = excluded.offset, max_ts = excluded.max_ts, lines = excluded.lines,
                       accepted = excluded.accepted, late = excluded.late, too_late = excluded.too_late,
                       malformed = excluded.malformed, head_hash = excluded.head_hash
                     WHERE excluded.offset >= partitions.offset",
                )
                .map_err(err)?;
            let mut checkpoint = tx
                .prepare_cached(
                    "INSERT INTO checkpoints (partition, minute, offset, max_ts, lines, accepted, late, too_late, malformed)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT (partition, minute) DO UPDATE SET offset = excluded.offset, max_ts = excluded.max_ts,
                       lines = excluded.lines, accepted = excluded.accepted, late = excluded.late,
                       too_late = excluded.too_late, malformed = excluded.malformed
                     WHERE excluded.offset > checkpoints.offset",
                )
                .map_err(err)?;
            for (name, p) in &batch.progress {
                let covered = self.head_hashes.get(name).copied().unwrap_or(0);
                let wanted = p.offset.min(4096);
                // The reader hashed the head: process 0 may not have the file (--local-logs).
                let hash = if wanted > covered || !self.head_hashes.contains_key(name) {
                    self.head_hashes.insert(name.clone(), wanted);
                    Some(p.head_hash)
                } else {
                    None
                };
                let max_ts = p.max_ts.map(|t| t as i64);
                let counters = [p.lines, p.accepted, p.late, p.too_late, p.malformed].map(|c| c as i64);
                match hash {
                    Some(hash) => progress.execute(params![
                        name, p.offset as i64, max_ts, counters[0], counters[1], counters[2], counters[3], counters[4], hash as i64
                    ]),
                    None => tx.execute(
                        "UPDATE partitions SET offset = ?2, max_ts = ?3, lines = ?4, accepted = ?5, late = ?6, too_late = ?7,
                           malformed = ?8 WHERE name = ?1 AND offset <= ?2",
                        params![name, p.offset as i64, max_ts, counters[0], counters[1], counters[2], counters[3], counters[4]],
                    ),
                }
                .map_err(err)?;
                if let Some(max_ts) = p.max_ts {
                    checkpoint
                        .execute(params![
                            name,
                            clickagg_dataflows::minute_of(max_ts),
                            p.offset as i64,
                            max_ts as i64,
                            counters[0],
                            counters[1],
                            counters[2],
                            counters[3],
                            counters[4]
                        ])
                        .map_err(err)?;
                }
            }
        }
        let set = |key: &str, value: String| {
            tx.execute("INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = excluded.value", [key, &value])
        };
        let advances = self.frontier.is_none_or(|f| frontier_value > f);
        if advances {
            set("frontier", frontier_value.to_string()).map_err(err)?;
            let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
            tx.execute(
                "INSERT OR REPLACE INTO commits (frontier, committed_at_ms, changes) VALUES (?1, ?2, ?3)",
                params![frontier_value as i64, now_ms, batch.changes.len() as i64],
            )
            .map_err(err)?;
        }
        if let Some(boundary) = batch.next_boundary {
            set("next_boundary", boundary.to_string()).map_err(err)?;
        }
        if let Some(minute) = batch.last_minute {
            set("last_minute", minute.to_string()).map_err(err)?;
        }
        if frontier.is_none() {
            set("complete", "1".to_string()).map_err(err)?;
        }
        tx.commit().map_err(err)?;
        if advances {
            self.frontier = Some(frontier_value);
        }
        let names = std::mem::take(&mut batch.partition_names);
        *batch = Batch { partition_names: names, ..Default::default() };
        Ok(())
    }

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
        let create = |name: &str| crate::sink::create(&dir.join(name)).map_err(|e| e.to_string());
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
        let windows: Vec<u32> = self
            .meta("settings")?
            .unwrap_or_default()
            .split_whitespace()
            .find_map(|s| s.strip_prefix("windows="))
            .map(|list| list.split(',').filter_map(|w| w.parse().ok()).collect())
            .unwrap_or_default();
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

/// Commits each batch to PostgreSQL, then hands it to the store's thread.
fn mirror_commits(
    mut mirror: crate::postgres_sink::PostgresSink,
    batches: std::sync::mpsc::Receiver<(Option<Time>, Batch)>,
    to_store: std::sync::mpsc::SyncSender<(Option<Time>, Batch)>,
) -> Result<(), String> {
    // Fault injection for the tests: die after this many mirror commits, right after one, when
    // the mirror is ahead of the store.
    let crash_after: Option<u64> = std::env::var("CLICKAGG_FAULT_CRASH_AFTER_MIRROR_COMMITS").ok().and_then(|n| n.parse().ok());
    let mut mirrored = 0u64;
    for (frontier, batch) in batches {
        {
            let _committing = MIRROR_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            mirrored += u64::from(mirror.commit(frontier, &batch)?);
            if crash_after == Some(mirrored) {
                eprintln!("clickagg: fault injected: exiting between the PostgreSQL commit and the store's");
                std::process::abort();
            }
        }
        if to_store.send((frontier, batch)).is_err() {
            // The store's thread stopped on an error, which `join` reports.
            break;
        }
    }
    Ok(())
}

/// 64 bits from the clock, the process and the address space: unique enough to tell two stores
/// apart, without a dependency for randomness.
fn new_store_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let local = 0u8;
    let seed = format!("{nanos} {} {:p}", std::process::id(), &local);
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(seed.as_bytes()))
}

/// A store cut short (a disk that lost its tail, a partial copy) can still answer the first pages
/// it is asked for. The header says how many pages the file held at its last checkpoint; a file
/// shorter than that lost some. Reading the header is O(1), where `PRAGMA quick_check` would read
/// the whole store and make recovery time grow with the log's length.
///
/// Not while the write-ahead log holds frames: a checkpoint copies the newest page 1 (with the
/// new page count) into the file before the pages after it, so a process killed part-way through
/// one leaves a file shorter than its header says, and the log still holds every page missing.
/// SQLite finishes that checkpoint from the log at the next open.
fn check_length(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    if std::fs::metadata(Path::new(&wal)).is_ok_and(|m| m.len() > 0) {
        return Ok(());
    }
    let mut header = [0u8; 100];
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot read the store {}: {e}", path.display()))?;
    let len = file.metadata().map_err(|e| format!("cannot read the store {}: {e}", path.display()))?.len();
    if file.read_exact(&mut header).is_err() {
        return Err(format!("the store {} is {len} bytes, shorter than an SQLite header; it was left as it is", path.display()));
    }
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().expect("four bytes"));
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        size => u64::from(size),
    };
    // The page count is valid only when the change counter matches "version valid for".
    let pages = if be32(24) == be32(92) { u64::from(be32(28)) } else { 0 };
    if len < pages * page_size {
        return Err(format!(
            "the store {} is damaged: it is {len} bytes but its header says {} pages of {page_size} bytes; \
             it was cut short, and was left as it is (restore it from a copy, or start a new store)",
            path.display(),
            pages
        ));
    }
    Ok(())
}

/// How many changelog rows one INSERT statement carries.
const CHANGELOG_ROWS_PER_INSERT: usize = 64;

/// Appends `changes` to the changelog, in order. A follower at 200k clicks/s commits a few hundred
/// thousand changelog rows a second, and one statement per row spent as much time binding,
/// stepping and resetting it as SQLite spent inserting: the rows go in
/// [`CHANGELOG_ROWS_PER_INSERT`] at a time, the remainder one by one.
fn insert_changelog(tx: &rusqlite::Transaction, changes: &[(Time, Answer, isize)]) -> rusqlite::Result<()> {
    let insert = |rows| tx.prepare_cached(&format!("INSERT INTO changelog (time, view, key, value, diff) VALUES {}", placeholders(5, rows)));
    let (mut many, mut one) = (insert(CHANGELOG_ROWS_PER_INSERT)?, insert(1)?);
    // Text is bound as a copy (SQLite's transient binding), so one key buffer serves every row.
    let mut key = String::new();
    let mut bind = |statement: &mut rusqlite::CachedStatement, at: usize, (time, answer, diff): &(Time, Answer, isize)| {
        let (view, value) = changelog_fields(answer, &mut key);
        statement.raw_bind_parameter(at + 1, *time as i64)?;
        statement.raw_bind_parameter(at + 2, view.as_ref())?;
        statement.raw_bind_parameter(at + 3, key.as_str())?;
        statement.raw_bind_parameter(at + 4, value as i64)?;
        statement.raw_bind_parameter(at + 5, *diff as i64)
    };
    for chunk in changes.chunks(CHANGELOG_ROWS_PER_INSERT) {
        if chunk.len() == CHANGELOG_ROWS_PER_INSERT {
            for (i, change) in chunk.iter().enumerate() {
                bind(&mut many, i * 5, change)?;
            }
            many.raw_execute()?;
        } else {
            for change in chunk {
                bind(&mut one, 0, change)?;
                one.raw_execute()?;
            }
        }
    }
    Ok(())
}

/// `rows` parenthesised lists of `columns` SQL parameters, for a multi-row `VALUES`.
fn placeholders(columns: usize, rows: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(", "));
    vec![row; rows].join(", ")
}

fn batch_partition_name(batch: &Batch, partition: u32) -> &str {
    batch.partition_names.get(partition as usize).map_or("?", String::as_str)
}

/// The per-minute tables an answer is a row of, numbered by their position here:
/// `(view, table, id column, count column)`. The store and the PostgreSQL mirror share them.
pub const ANSWER_TABLES: [(View, &str, &str, &str); 5] = [
    (View::AdMinute, "ad_minute", "ad_id", "clicks"),
    (View::CampaignMinute, "campaign_minute", "campaign_id", "clicks"),
    (View::CountryMinute, "country_minute", "ad_id", "clicks"),
    (View::TopMinute, "top_minute", "ad_id", "clicks"),
    (View::FraudMinute, "fraud_minute", "ad_id", "excluded_clicks"),
];

/// An answer as a row of one of `ANSWER_TABLES`.
#[derive(Clone, Copy, Debug)]
pub struct AnswerRow {
    /// The table's position in `ANSWER_TABLES`.
    pub table: usize,
    pub minute: Minute,
    /// Only `country_minute` rows have one.
    pub country: Option<clickagg_dataflows::Country>,
    pub id: u64,
    pub clicks: u64,
}

impl AnswerRow {
    /// `None` for the current window tops: the sink keeps them, the tables keep their snapshots.
    pub fn of(answer: &Answer) -> Option<AnswerRow> {
        let (view, minute, country, id, clicks) = match *answer {
            Answer::AdMinute { minute, ad, clicks } => (View::AdMinute, minute, None, ad, clicks),
            Answer::CampaignMinute { minute, campaign, clicks } => (View::CampaignMinute, minute, None, campaign, clicks),
            Answer::CountryMinute { minute, country, ad, clicks } => (View::CountryMinute, minute, Some(country), ad, clicks),
            Answer::TopMinute { minute, ad, clicks } => (View::TopMinute, minute, None, ad, clicks),
            Answer::FraudMinute { minute, ad, clicks } => (View::FraudMinute, minute, None, ad, clicks),
            Answer::TopWindow { .. } => return None,
        };
        let table = ANSWER_TABLES.iter().position(|t| t.0 == view).expect("every per-minute view has a table");
        Some(AnswerRow { table, minute, country, id, clicks })
    }

    /// The row's primary key: `(table, minute, country code, id)`.
    pub fn key(&self) -> (usize, Minute, u16, u64) {
        (self.table, self.minute, self.country.map_or(0, |c| c.0), self.id)
    }
}

/// Writes answer rows with statements prepared once per transaction: a tick at 200k clicks/s
/// applies ~10^5 of them, and looking each statement up in rusqlite's cache by its SQL text cost
/// more than SQLite's own work for some. Inserts wait, table by table, to go in
/// [`ROWS_PER_UPSERT`] to a statement (binding, stepping and resetting a statement cost as much
/// as the row); each table's operations keep their order, as a delete first sends the inserts
/// before it, and [`AnswerRows::finish`] sends the rest.
struct AnswerRows<'tx> {
    /// `INSERT OR REPLACE` of one row, of `ROWS_PER_UPSERT` rows, and `DELETE`, of each of
    /// `ANSWER_TABLES`.
    upsert: Vec<rusqlite::CachedStatement<'tx>>,
    upsert_many: Vec<rusqlite::CachedStatement<'tx>>,
    delete: Vec<rusqlite::CachedStatement<'tx>>,
    /// Rows to insert, by table, fewer than `ROWS_PER_UPSERT` each.
    waiting: Vec<Vec<AnswerRow>>,
}

/// How many answer rows one `INSERT OR REPLACE` carries.
const ROWS_PER_UPSERT: usize = 64;

impl<'tx> AnswerRows<'tx> {
    fn new(tx: &'tx rusqlite::Transaction<'_>) -> rusqlite::Result<AnswerRows<'tx>> {
        let mut rows = AnswerRows {
            upsert: Vec::new(),
            upsert_many: Vec::new(),
            delete: Vec::new(),
            waiting: vec![Vec::with_capacity(ROWS_PER_UPSERT); ANSWER_TABLES.len()],
        };
        for (view, table, id, clicks) in ANSWER_TABLES {
            let (columns, country, country_is) =
                if view == View::CountryMinute { (4, ", country", " AND country = ?4") } else { (3, "", "") };
            let upsert = |rows| format!("INSERT OR REPLACE INTO {table} (minute, {id}, {clicks}{country}) VALUES {}", placeholders(columns, rows));
            rows.upsert.push(tx.prepare_cached(&upsert(1))?);
            rows.upsert_many.push(tx.prepare_cached(&upsert(ROWS_PER_UPSERT))?);
            rows.delete.push(tx.prepare_cached(&format!("DELETE FROM {table} WHERE minute = ?1 AND {id} = ?2 AND {clicks} = ?3{country_is}"))?);
        }
        Ok(rows)
    }

    /// Inserts (`insert`) or deletes one answer row; an insert replaces the row of the same key.
    fn apply(&mut self, answer: &Answer, insert: bool) -> rusqlite::Result<()> {
        let Some(row) = AnswerRow::of(answer) else { return Ok(()) };
        if insert {
            self.waiting[row.table].push(row);
            if self.waiting[row.table].len() == ROWS_PER_UPSERT {
                self.insert_waiting(row.table)?;
            }
            return Ok(());
        }
        self.insert_waiting(row.table)?;
        bind_row(&mut self.delete[row.table], 0, &row)?;
        self.delete[row.table].raw_execute()?;
        Ok(())
    }

    /// Inserts the rows waiting for `table`.
    fn insert_waiting(&mut self, table: usize) -> rusqlite::Result<()> {
        let rows = &mut self.waiting[table];
        if rows.len() == ROWS_PER_UPSERT {
            let statement = &mut self.upsert_many[table];
            let columns = statement.parameter_count() / ROWS_PER_UPSERT;
            for (i, row) in rows.iter().enumerate() {
                bind_row(statement, i * columns, row)?;
            }
            statement.raw_execute()?;
        } else {
            for row in rows.iter() {
                bind_row(&mut self.upsert[table], 0, row)?;
                self.upsert[table].raw_execute()?;
            }
        }
        rows.clear();
        Ok(())
    }

    /// Inserts every row still waiting: without it they are lost from the transaction.
    fn finish(mut self) -> rusqlite::Result<()> {
        (0..ANSWER_TABLES.len()).try_for_each(|table| self.insert_waiting(table))
    }
}

/// Binds `row` to the parameters after the first `at` of `statement`: minute, id, clicks, and
/// the country of a `country_minute` row. Ids are stored as the i64 bit patterns of u64s.
fn bind_row(statement: &mut rusqlite::CachedStatement, at: usize, row: &AnswerRow) -> rusqlite::Result<()> {
    statement.raw_bind_parameter(at + 1, row.minute)?;
    statement.raw_bind_parameter(at + 2, row.id as i64)?;
    statement.raw_bind_parameter(at + 3, row.clicks as i64)?;
    if let Some(country) = row.country {
        // Its two letters, as `Country`'s `Display` writes them, without a `String` per row.
        statement.raw_bind_parameter(at + 4, rusqlite::types::ToSqlOutput::Borrowed(rusqlite::types::ValueRef::Text(&country.as_bytes())))?;
    }
    Ok(())
}

/// Commits on a thread of its own, so that worker 0 computes the next watermark advance while
/// SQLite writes and syncs this one. One thread and one queue keep the commits in order; the
/// queue holds one advance, so a store slower than the dataflow slows the dataflow down instead
/// of filling memory. Each queued batch is still one transaction.
///
/// With a PostgreSQL mirror, a thread of its own commits each advance to PostgreSQL and then
/// hands it on to the store's thread: PostgreSQL takes advance k+1 while SQLite takes advance k,
/// and the mirror is never behind the store (see `postgres_sink`).
pub struct Committer {
    queue: Option<std::sync::mpsc::SyncSender<(Option<Time>, Batch)>>,
    thread: Option<std::thread::JoinHandle<Result<Store, String>>>,
    mirror_thread: Option<std::thread::JoinHandle<Result<(), String>>>,
    /// The frontier of the last batch sent.
    sent: Option<Time>,
    /// When a batch was last sent, and the partitions' progress committed without answers.
    sent_at: std::time::Instant,
    progress_sent: BTreeMap<String, PartitionProgress>,
}

/// How often a follower that reads lines but moves no watermark (duplicates, a caught-up log
/// whose last rows wait for the watermark) commits its offsets.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Held while PostgreSQL commits, as `COMMIT_LOCK` is while the store does.
pub static MIRROR_LOCK: Mutex<()> = Mutex::new(());

impl Committer {
    pub fn start(store: Store, mirror: Option<crate::postgres_sink::PostgresSink>) -> Committer {
        let sent = store.frontier;
        let (queue, batches) = std::sync::mpsc::sync_channel::<(Option<Time>, Batch)>(1);
        let (store_batches, mirror_thread) = match mirror {
            None => (batches, None),
            Some(mirror) => {
                let (to_store, store_batches) = std::sync::mpsc::sync_channel::<(Option<Time>, Batch)>(1);
                let thread = std::thread::Builder::new()
                    .name("clickagg:postgres".into())
                    .spawn(move || mirror_commits(mirror, batches, to_store))
                    .expect("spawning the PostgreSQL commit thread");
                (store_batches, Some(thread))
            }
        };
        let thread = std::thread::Builder::new()
            .name("clickagg:commit".into())
            .spawn(move || {
                let mut store = store;
                for (frontier, mut batch) in store_batches {
                    let _committing = COMMIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
                    store.commit(frontier, &mut batch)?;
                }
                Ok(store)
            })
            .expect("spawning the commit thread");
        Committer { queue: Some(queue), thread: Some(thread), mirror_thread, sent, sent_at: std::time::Instant::now(), progress_sent: BTreeMap::new() }
    }

    /// Hands `batch` to the commit thread with `frontier`, leaving `batch` empty (its partition
    /// names kept). A batch of progress alone, with no new frontier, waits for the next one:
    /// offsets without answers need no transaction of their own, except now and then
    /// (`PROGRESS_EVERY`), so that the offsets of lines that move nothing still get committed.
    pub fn commit(&mut self, frontier: Option<Time>, batch: &mut Batch) -> Result<(), String> {
        let advances = match (frontier, self.sent) {
            (None, _) | (_, None) => true,
            (Some(f), Some(sent)) => f > sent,
        };
        let has_answers = !(batch.changes.is_empty() && batch.snapshots.is_empty() && batch.dead_letters.is_empty());
        if !advances && !has_answers {
            let new_progress = batch.progress.iter().any(|(name, p)| self.progress_sent.get(name) != Some(p));
            if !new_progress || self.sent_at.elapsed() < PROGRESS_EVERY {
                return Ok(());
            }
        }
        self.sent_at = std::time::Instant::now();
        self.progress_sent.extend(batch.progress.iter().map(|(name, p)| (name.clone(), *p)));
        let names = batch.partition_names.clone();
        let full = std::mem::replace(batch, Batch { partition_names: names, ..Default::default() });
        self.sent = frontier.or(Some(Time::MAX)).max(self.sent);
        let queue = self.queue.as_ref().expect("the queue lives until finish");
        if queue.send((frontier, full)).is_err() {
            // The thread stopped on an error: that error is the one to report.
            return Err(self.join().err().unwrap_or_else(|| "the commit thread stopped".into()));
        }
        Ok(())
    }

    /// Waits for every queued commit and returns the store.
    pub fn finish(mut self) -> Result<Store, String> {
        self.join()
    }

    fn join(&mut self) -> Result<Store, String> {
        self.queue = None;
        // The mirror's error first: when it stops, the store's thread just sees its queue end.
        if let Some(mirror) = self.mirror_thread.take() {
            mirror.join().map_err(|_| "the PostgreSQL commit thread panicked".to_string())??;
        }
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| "the commit thread panicked".to_string())?,
            None => Err("the commit thread was already joined".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickagg_dataflows::Country;

    fn table_rows(conn: &Connection) -> Vec<String> {
        let mut rows = Vec::new();
        for (_, table, ..) in ANSWER_TABLES {
            let mut statement = conn.prepare(&format!("SELECT * FROM {table} ORDER BY 1, 2, 3")).unwrap();
            let columns = statement.column_count();
            let mut query = statement.query([]).unwrap();
            while let Some(row) = query.next().unwrap() {
                let values: Vec<String> = (0..columns).map(|i| format!("{:?}", row.get_ref(i).unwrap())).collect();
                rows.push(format!("{table} {}", values.join(" ")));
            }
        }
        rows
    }

    /// Inserts that wait to go in many to a statement end where the same operations, one
    /// statement each, end: whole and partial statements, keys inserted again while their last
    /// insert waits, and (in `top_minute`, as ads leave a top K) deletes of rows whose inserts
    /// still wait.
    #[test]
    fn batched_answer_rows_end_as_one_statement_per_row_does() {
        let mut state = 7u64;
        let mut next = |n: u64| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let mut operations = Vec::new();
        let mut current: std::collections::HashMap<(u64, u32, u64), u64> = Default::default();
        for _ in 0..6_000 {
            let (kind, minute, id) = (next(4), next(2) as u32, next(300));
            let clicks = current.get(&(kind, minute, id)).copied();
            let answer = |clicks| match kind {
                0 => Answer::AdMinute { minute, ad: id, clicks },
                1 => Answer::CountryMinute { minute, country: Country(u16::from_be_bytes([b'A' + (id % 3) as u8, b'U'])), ad: id, clicks },
                2 => Answer::TopMinute { minute, ad: id, clicks },
                _ => Answer::CampaignMinute { minute, campaign: id, clicks },
            };
            match clicks {
                Some(clicks) if kind == 2 && next(3) == 0 => {
                    operations.push((answer(clicks), false));
                    current.remove(&(kind, minute, id));
                }
                _ => {
                    let clicks = clicks.unwrap_or(0) + 1;
                    operations.push((answer(clicks), true));
                    current.insert((kind, minute, id), clicks);
                }
            }
        }
        let mut ends = Vec::new();
        for batched in [true, false] {
            let mut conn = Connection::open_in_memory().unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            let tx = conn.transaction().unwrap();
            let mut rows = AnswerRows::new(&tx).unwrap();
            for (answer, insert) in &operations {
                rows.apply(answer, *insert).unwrap();
                if !batched {
                    // Sends each insert as it comes, by itself.
                    rows = { rows.finish().unwrap(); AnswerRows::new(&tx).unwrap() };
                }
            }
            rows.finish().unwrap();
            tx.commit().unwrap();
            ends.push(table_rows(&conn));
        }
        assert!(ends[0].len() > 100, "the operations leave rows to compare: {}", ends[0].len());
        assert_eq!(ends[0], ends[1]);
    }
}
