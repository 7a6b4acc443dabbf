//! The store's tables and indexes for the server (SPEC §6): minutes that are final are read from
//! the store, so the store holds what the server answers from besides SPEC §4's tables, and
//! indexes each of the API's access paths.
//!
//! - `campaign_country_minute` and `top_country_minute`: the serving-only answers (a campaign's
//!   clicks per country per minute, the top K of each minute in each country), which no output
//!   file has. `export` never writes them.
//! - Indexes: an ad's minutes over a range (`ad_minute_by_span_ad`), a campaign's
//!   (`campaign_minute_by_span_campaign`), an ad's in one country (`country_minute_by_span_ad`),
//!   a campaign's in one country (`campaign_country_minute_by_span_campaign`),
//!   the history of an ad-minute (`changelog_ad_minute`, over the changelog's `ad_minute` rows
//!   only).
//! - The by-id indexes lead with the minute's span of [`SPAN_MINUTES`] (`minute / 64`): each
//!   commit adds a row for every ad of the minutes it makes final, and keyed by id first those
//!   rows land on a page per ad anywhere in the index, whose pages then all stay hot: the cost
//!   of a commit grew with the store, and a `--serve` replay of 240 minutes took 8.4× the time
//!   of one of 60 minutes at the same rate. Keyed by span first, a commit writes within the
//!   last span; a query over a range seeks once per span it covers. For the same reason the
//!   serving tables are keyed by minute first (a store written before that keeps its
//!   `campaign_country_minute` keyed by campaign, which the same queries read as well).
//!   The top K of a minute (global or in a country) is a prefix of its table's primary key.
//!
//! Everything is created with `IF NOT EXISTS` when the store is opened to be written, so a store
//! written before these tables existed gains them (its earlier minutes have no serving rows).

use clickagg_dataflows::{ServingAnswer, Time};
use rusqlite::{params, Connection, Transaction};

/// Minutes per span of the by-id indexes (`minute / 64` in their definitions and queries).
pub const SPAN_MINUTES: u32 = 64;

/// The serving tables and the access-path indexes (which replace the by-id indexes of earlier
/// versions, keyed without the span).
pub const SERVING_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS campaign_country_minute (campaign_id INTEGER NOT NULL, country TEXT NOT NULL,
    minute INTEGER NOT NULL, clicks INTEGER NOT NULL, PRIMARY KEY (minute, country, campaign_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS top_country_minute (minute INTEGER NOT NULL, country TEXT NOT NULL, ad_id INTEGER NOT NULL,
    clicks INTEGER NOT NULL, PRIMARY KEY (minute, country, ad_id)) WITHOUT ROWID;
DROP INDEX IF EXISTS ad_minute_by_ad;
DROP INDEX IF EXISTS campaign_minute_by_campaign;
DROP INDEX IF EXISTS country_minute_by_ad;
CREATE INDEX IF NOT EXISTS ad_minute_by_span_ad ON ad_minute (minute / 64, ad_id, minute, clicks);
CREATE INDEX IF NOT EXISTS campaign_minute_by_span_campaign ON campaign_minute (minute / 64, campaign_id, minute, clicks);
CREATE INDEX IF NOT EXISTS campaign_country_minute_by_span_campaign
    ON campaign_country_minute (minute / 64, campaign_id, country, minute, clicks);
CREATE INDEX IF NOT EXISTS country_minute_by_span_ad ON country_minute (minute / 64, ad_id, country, minute, clicks);
CREATE INDEX IF NOT EXISTS changelog_ad_minute ON changelog (key) WHERE view = 'ad_minute';
";

/// Creates the serving tables and indexes if the store lacks them.
pub fn ensure(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(SERVING_SCHEMA)
}

/// A serving answer as a row: `(table, minute, country, id, clicks)`; `None` for the sliding
/// answers, which only the live dataflow has.
fn row_of(answer: &ServingAnswer) -> Option<(usize, u32, [u8; 2], u64, u64)> {
    match *answer {
        ServingAnswer::CampaignCountryMinute { minute, country, campaign, clicks } => Some((0, minute, country.as_bytes(), campaign, clicks)),
        ServingAnswer::TopCountryMinute { minute, country, ad, clicks } => Some((1, minute, country.as_bytes(), ad, clicks)),
        ServingAnswer::TopCountryWindow { .. } | ServingAnswer::CampaignWindow { .. } => None,
    }
}

/// Writes the serving answers' changes, in time order, into their tables: within one time a
/// changed answer is `-old`, `+new` of one key, and the insertion replaces the row, so only
/// retractions of keys with no insertion at that time are deletes (as for SPEC §4's tables).
pub fn write(tx: &Transaction, changes: &[(Time, ServingAnswer, isize)]) -> rusqlite::Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    let mut upsert = [
        tx.prepare_cached("INSERT OR REPLACE INTO campaign_country_minute (minute, country, campaign_id, clicks) VALUES (?1, ?2, ?3, ?4)")?,
        tx.prepare_cached("INSERT OR REPLACE INTO top_country_minute (minute, country, ad_id, clicks) VALUES (?1, ?2, ?3, ?4)")?,
    ];
    let mut delete = [
        tx.prepare_cached("DELETE FROM campaign_country_minute WHERE minute = ?1 AND country = ?2 AND campaign_id = ?3 AND clicks = ?4")?,
        tx.prepare_cached("DELETE FROM top_country_minute WHERE minute = ?1 AND country = ?2 AND ad_id = ?3 AND clicks = ?4")?,
    ];
    let mut inserted = std::collections::HashSet::new();
    for at_one_time in changes.chunk_by(|a, b| a.0 == b.0) {
        inserted.clear();
        let rows = at_one_time.iter().filter_map(|(_, answer, diff)| Some((row_of(answer)?, *diff)));
        inserted.extend(rows.clone().filter(|(_, diff)| *diff > 0).map(|((table, minute, country, id, _), _)| (table, minute, country, id)));
        for ((table, minute, country, id, clicks), diff) in rows.clone() {
            if diff < 0 && !inserted.contains(&(table, minute, country, id)) {
                delete[table].execute(params![minute, country_text(&country), id as i64, clicks as i64])?;
            }
        }
        for ((table, minute, country, id, clicks), diff) in rows {
            if diff > 0 {
                upsert[table].execute(params![minute, country_text(&country), id as i64, clicks as i64])?;
            }
        }
    }
    Ok(())
}

/// Creates a whole store's tables, the serving ones included, in `conn` (an empty database):
/// for checking the server's queries against the schema they run on.
pub fn create_all(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(super::schema::SCHEMA)?;
    ensure(conn)
}

/// A country's two letters as SQL text, as `country_minute` stores them.
pub fn country_text(letters: &[u8; 2]) -> &str {
    std::str::from_utf8(letters).unwrap_or("??")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clickagg_dataflows::Country;

    #[test]
    fn serving_rows_follow_retractions_and_replacements() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(crate::storage::sqlite::schema::SCHEMA).unwrap();
        ensure(&conn).unwrap();
        let au = Country::parse(b"AU").unwrap();
        let top = |ad, clicks| ServingAnswer::TopCountryMinute { minute: 3, country: au, ad, clicks };
        let campaign = |clicks| ServingAnswer::CampaignCountryMinute { minute: 3, country: au, campaign: 9, clicks };
        let tx = conn.transaction().unwrap();
        write(&tx, &[(1, top(5, 2), 1), (1, campaign(2), 1), (2, campaign(2), -1), (2, campaign(4), 1), (2, top(5, 2), -1), (2, top(6, 1), 1)])
            .unwrap();
        tx.commit().unwrap();
        let rows = |sql: &str| -> Vec<(i64, i64)> {
            conn.prepare(sql).unwrap().query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap().collect::<Result<_, _>>().unwrap()
        };
        assert_eq!(rows("SELECT campaign_id, clicks FROM campaign_country_minute WHERE country = 'AU'"), vec![(9, 4)]);
        assert_eq!(rows("SELECT ad_id, clicks FROM top_country_minute WHERE country = 'AU'"), vec![(6, 1)]);
    }
}
