//! Reading the committed answers as reconciliation compares them, and writing reconciled answers
//! into the store as a new version (`reconcile --apply`).

use std::path::Path;

use rusqlite::{params, TransactionBehavior};

use clickagg_dataflows::{Minute, View};

use super::commit::AnswerRows;
use super::{sql_error, Store};
use crate::model::{AnswerKey, Answers};

impl Store {
    /// The committed per-minute answers whose minute is `in_range`, keyed as reconcile compares them.
    pub fn answers(&self, in_range: impl Fn(Minute) -> bool) -> Result<Answers, String> {
        let err = |e: rusqlite::Error| sql_error(&self.path, e);
        let mut answers = Answers::new();
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
        corrections: &[(AnswerKey, u64, u64)],
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
}
