//! The store's tables.

/// The tables of a new store. Ids are stored as the i64 bit patterns of u64s.
pub(super) const SCHEMA: &str = "
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
