//! The SQLite store, the durable one (docs/durability.md): an embedded database that holds the
//! answers of SPEC §4 as tables, the changelog, the dead letters, and per partition the progress
//! and the checkpoints that recovery restarts from; all of one watermark advance in one
//! transaction.
//!
//! Why SQLite: one file any tool can open (`sqlite3 store.db 'select …'`), transactions that
//! survive `kill -9` (write-ahead log, `synchronous=FULL`), a bundled build with no system
//! dependency, and SQL for the reconciliation and the analysts. redb or fjall would be faster
//! key-value stores, but every reader would need our code to look inside.
//!
//! The store's jobs, one file each: its tables ([`schema`]), a watermark advance's transaction
//! ([`commit`]), the files written from it ([`export`]), reconciled answers written into it
//! ([`reconcile`]), and a check that the file was not cut short ([`header`]).

mod commit;
mod export;
mod header;
mod reconcile;
mod schema;
pub mod serving;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};

use clickagg_dataflows::{Minute, PartitionProgress, Time};

use super::{Committed, SCHEMA_VERSION};
use crate::model::AnswerSettings;
use crate::source::kafka::TopicPartitions;
use crate::source::Located;
use header::check_length;
use schema::SCHEMA;

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
    // The batched upserts (one statement for many rows) each keep a statement journal, to undo
    // that statement alone; in a temporary file, its writes were a tenth of a served replay's
    // CPU time (perf: `subjournalPage` → `pwrite64` under the committer). In memory it holds
    // the pages one statement changes, and nothing is durable in it either way.
    conn.pragma_update(None, "temp_store", "MEMORY").map_err(|e| sql_error(path, e))?;
    Ok(conn)
}

fn sql_error(path: &Path, e: rusqlite::Error) -> String {
    format!("store {}: {e}", path.display())
}

pub use crate::source::head_hash;

impl Store {
    /// Opens the store at `path`, or creates it when nothing is there. `settings` are the
    /// settings that change answers: a store written under other settings is refused, as is a
    /// file that is not a store of this version, and such a file is never written to.
    /// Returns what was committed before, if anything.
    /// `partitions` are the partitions there now (files in the log directory, or a topic's): each
    /// one the store has read must still be the one it read. `logs` says where they are.
    pub fn open(path: &Path, settings: &AnswerSettings, logs: &str, partitions: &Located<'_>) -> Result<(Store, Option<Committed>), String> {
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
            if stored_settings != *settings {
                return Err(format!(
                    "the store {} was written with other settings; resuming would mix two sets of answers:\n{}",
                    path.display(),
                    stored_settings.differences("in the store", settings, "now")
                ));
            }
            if existing.meta("complete")?.is_some() {
                return Err(format!(
                    "the store {} holds a finished replay (the end of the logs was committed); export it with \
                     `clickagg export`, or start a new store",
                    path.display()
                ));
            }
            match partitions {
                Located::Files(paths) => existing.check_partitions(paths)?,
                Located::Topic(topic) => existing.check_topic_partitions(topic)?,
            }
        }
        let conn = open_writable(path, !exists)?;
        let mut store = Store { conn, path: path.to_path_buf(), frontier: None, head_hashes: BTreeMap::new() };
        if !exists {
            store.conn.execute_batch(SCHEMA).map_err(|e| sql_error(path, e))?;
            store.set_meta("schema_version", &SCHEMA_VERSION.to_string())?;
            store.set_meta("clickagg_version", env!("CARGO_PKG_VERSION"))?;
            store.set_meta("settings", &settings.to_json())?;
            store.set_meta("logs", logs)?;
            store.set_meta("store_id", &new_store_id())?;
            return Ok((store, None));
        }
        if store.meta("store_id")?.is_none() {
            store.set_meta("store_id", &new_store_id())?;
        }
        let committed = store.committed()?;
        store.frontier = committed.as_ref().map(|c| c.frontier);
        for (name, offset) in store.read_offsets()? {
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

    /// The settings the store was written with: JSON, or the text of stores written before
    /// the settings were typed, read field by field.
    pub fn settings(&self) -> Result<AnswerSettings, String> {
        let text = self.meta("settings")?.ok_or_else(|| format!("store {}: no settings recorded", self.path.display()))?;
        AnswerSettings::parse(&text).map_err(|e| format!("store {}: {e}", self.path.display()))
    }

    /// Minutes before this one are final in the store (no later commit can change them); `None`
    /// when the store holds a finished replay, whose every minute is final.
    pub fn final_minutes_before(&self, rules: &clickagg_dataflows::EventTimeRules) -> Result<Option<Minute>, String> {
        if self.meta("complete")?.is_some() {
            return Ok(None);
        }
        Ok(Some(self.committed()?.map_or(0, |c| rules.final_minutes_before(c.frontier))))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds the tables and indexes the server reads final minutes through (`serving`).
    pub fn prepare_for_serving(&self) -> Result<(), String> {
        serving::ensure(&self.conn).map_err(|e| sql_error(&self.path, e))
    }

    /// Bounds the writer's page cache to `cache_kib` (it is part of the process's RSS).
    pub fn set_cache_kib(&mut self, cache_kib: i64) -> Result<(), String> {
        self.conn.pragma_update(None, "cache_size", -cache_kib).map_err(|e| sql_error(&self.path, e))
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

    /// Where the committed lines of `partition` end: every line before this offset was read by
    /// a run whose updates are committed, and no line after it (0: none was).
    pub fn committed_offset(&self, partition: &str) -> Result<u64, String> {
        self.conn
            .query_row("SELECT offset FROM partitions WHERE name = ?1", [partition], |r| r.get::<_, i64>(0))
            .optional()
            .map(|offset| offset.map_or(0, |o| o as u64))
            .map_err(|e| sql_error(&self.path, e))
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

    /// Each partition the store has read, with where its committed lines end.
    fn read_offsets(&self) -> Result<Vec<(String, u64)>, String> {
        let mut statement = self.conn.prepare("SELECT name, offset FROM partitions").map_err(|e| sql_error(&self.path, e))?;
        let rows = statement
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(|e| sql_error(&self.path, e));
        rows
    }

    /// Checks that each topic partition the store has read is still in the topic, and has not
    /// gone back below the offset committed (a topic deleted and created again under the same
    /// name). Offsets deleted by retention are checked where reading starts.
    pub fn check_topic_partitions(&self, topic: &TopicPartitions) -> Result<(), String> {
        for (name, offset) in self.read_offsets()? {
            let Some(index) = topic.index_of(&name) else {
                return Err(format!(
                    "partition {name} was read into the store {} but the topic has no such partition now \
                     (it has {}): resume with the topic the store was made from, or start a new store",
                    self.path.display(),
                    topic.names.len()
                ));
            };
            if topic.high[index] < offset {
                return Err(format!(
                    "the store {} committed reading {name} up to offset {offset}, but the partition ends at offset {}: \
                     the topic was deleted and created again, and resuming would count or lose clicks",
                    self.path.display(),
                    topic.high[index]
                ));
            }
        }
        Ok(())
    }

}

impl super::RunStore for Store {
    fn frontier(&self) -> Option<Time> {
        self.frontier
    }

    fn summarize(&self, summary: &mut crate::model::Summary) -> Result<(), String> {
        Store::summarize(self, summary)
    }
}

/// 64 bits from the clock, the process and the address space: unique enough to tell two stores
/// apart, without a dependency for randomness.
fn new_store_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let local = 0u8;
    let seed = format!("{nanos} {} {:p}", std::process::id(), &local);
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(seed.as_bytes()))
}
