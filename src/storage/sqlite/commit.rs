//! One watermark advance committed to the store: the changelog, the answer tables, the window
//! snapshots, the dead letters and the partitions' progress, in one transaction.

use rusqlite::{params, TransactionBehavior};

use clickagg_dataflows::hashing::FastHasher;
use clickagg_dataflows::{Answer, Time, View};

use super::{sql_error, Store};
use crate::output::changelog_fields;
use crate::storage::{AnswerRow, Batch, CommitStore, ANSWER_TABLES};

impl CommitStore for Store {
    /// Commits `batch` and the frontier in one transaction. `frontier: None` is the end of the
    /// input (replay): the store is then complete. A frontier behind the committed one (during
    /// recovery) with an empty batch commits nothing.
    fn commit(&mut self, frontier: Option<Time>, batch: &Batch) -> Result<bool, String> {
        let frontier_value = frontier.unwrap_or(Time::MAX);
        if self.frontier.is_some_and(|f| frontier_value <= f) && batch.is_empty() {
            return Ok(false);
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
            super::serving::write(&tx, &batch.serving).map_err(err)?;
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
        Ok(true)
    }
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

/// Writes answer rows with statements prepared once per transaction: a tick at 200k clicks/s
/// applies ~10^5 of them, and looking each statement up in rusqlite's cache by its SQL text cost
/// more than SQLite's own work for some. Inserts wait, table by table, to go in
/// [`ROWS_PER_UPSERT`] to a statement (binding, stepping and resetting a statement cost as much
/// as the row); each table's operations keep their order, as a delete first sends the inserts
/// before it, and [`AnswerRows::finish`] sends the rest.
pub(super) struct AnswerRows<'tx> {
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
    pub(super) fn new(tx: &'tx rusqlite::Transaction<'_>) -> rusqlite::Result<AnswerRows<'tx>> {
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
    pub(super) fn apply(&mut self, answer: &Answer, insert: bool) -> rusqlite::Result<()> {
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
    pub(super) fn finish(mut self) -> rusqlite::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::sqlite::schema::SCHEMA;
    use rusqlite::Connection;
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
