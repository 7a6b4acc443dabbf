//! `run --sink postgres://…` (issue #6) against a real PostgreSQL server on loopback, started
//! from Debian's package by `scripts/test-postgres.sh` (installed when missing): the database
//! holds exactly what the store holds, table for table and the changelog row for row, after a
//! replay, after a crash between the two commits, and after SIGKILLs while following; and a
//! database that does not match the store is refused.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::assert_same_outputs;
use common::follow::{
    clean_replay, clickagg, export, generate, kill_at_random_moments, run_err, run_ok, s, start_follower, stop_when_caught_up,
    store_position, Writer, SETTINGS,
};

/// A PostgreSQL server of the test's own, stopped when dropped.
struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
}

impl Postgres {
    fn start() -> Postgres {
        Postgres::start_with(&[])
    }

    /// A server that takes TLS connections only, with a self-signed certificate for localhost
    /// and 127.0.0.1 ([`Postgres::certificate`]).
    fn start_tls() -> Postgres {
        Postgres::start_with(&["tls"])
    }

    fn start_with(options: &[&str]) -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let output = Command::new("bash")
            .args(["scripts/test-postgres.sh", "start", s(dir.path()), &port.to_string()])
            .args(options)
            .output()
            .expect("bash runs");
        assert!(output.status.success(), "PostgreSQL did not start: {}", String::from_utf8_lossy(&output.stderr));
        Postgres { dir, port }
    }

    /// A new, empty database on the server.
    fn database(&self, name: &str) -> String {
        let mut admin = client(&self.url("clickagg")).unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        self.url(name)
    }

    fn url(&self, database: &str) -> String {
        format!("postgres://clickagg@127.0.0.1:{}/{database}", self.port)
    }

    /// The TLS server's certificate, its own root.
    fn certificate(&self) -> PathBuf {
        self.dir.path().join("tls").join("server.crt")
    }
}

/// The tests' own connection: TLS when the server offers it (libpq's `prefer`), unverified.
fn client(url: &str) -> Result<postgres::Client, postgres::Error> {
    let tls = native_tls::TlsConnector::builder().danger_accept_invalid_certs(true).build().unwrap();
    postgres::Client::connect(url, postgres_native_tls::MakeTlsConnector::new(tls))
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new("bash").args(["scripts/test-postgres.sh", "stop", s(self.dir.path())]).output();
    }
}

/// Every table both hold, as sorted text rows (the changelog in commit order), and the meta keys
/// that say where each left off. Ids are compared as the u64 the logs hold.
const TABLES: [(&str, &str, &str); 9] = [
    ("ad_minute", "minute, ad_id, clicks", ""),
    ("campaign_minute", "minute, campaign_id, clicks", ""),
    ("country_minute", "minute, country, ad_id, clicks", ""),
    ("top_minute", "minute, ad_id, clicks", ""),
    ("fraud_minute", "minute, ad_id, excluded_clicks", ""),
    ("top_window", "window_minutes, as_of, ad_id, clicks", ""),
    ("changelog", "time, view, key, value, diff", "ORDER BY seq"),
    ("dead_letter", "partition, \"offset\", reason, {hex}, time", ""),
    ("partitions", "name, \"offset\", max_ts, lines, accepted, late, too_late, malformed", ""),
];
const META: [&str; 5] = ["settings", "frontier", "next_boundary", "last_minute", "complete"];

fn postgres_tables(url: &str) -> BTreeMap<String, Vec<String>> {
    let mut client = client(url).unwrap();
    let mut tables = BTreeMap::new();
    for (table, columns, order) in TABLES {
        let columns = columns.replace("{hex}", "encode(line,'hex')");
        let text = columns.split(", ").map(|c| format!("coalesce({c}::text, 'null')")).collect::<Vec<_>>().join(" || ',' || ");
        let rows = client.query(&format!("SELECT {text} FROM {table} {order}"), &[]).unwrap();
        tables.insert(table.to_string(), sorted_unless(order, rows.iter().map(|r| r.get::<_, String>(0)).collect()));
    }
    for key in META {
        let value = client.query_opt("SELECT value FROM clickagg_meta WHERE key = $1", &[&key]).unwrap().map(|r| r.get::<_, String>(0));
        tables.insert(format!("meta {key}"), value.into_iter().collect());
    }
    tables
}

fn store_tables(store: &Path) -> BTreeMap<String, Vec<String>> {
    let conn = rusqlite::Connection::open_with_flags(store, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut tables = BTreeMap::new();
    for (table, columns, order) in TABLES {
        let columns = columns.replace("{hex}", "lower(hex(line))");
        // Ids are stored as the i64 bit patterns of u64s; diffs are signed.
        let ids: Vec<bool> = columns.split(", ").map(|c| c.ends_with("_id")).collect();
        let mut statement = conn.prepare(&format!("SELECT {columns} FROM {table} {order}")).unwrap();
        let rows = statement
            .query_map([], |row| {
                let fields: Vec<String> = (0..ids.len())
                    .map(|i| match row.get_ref(i).unwrap() {
                        rusqlite::types::ValueRef::Null => "null".to_string(),
                        rusqlite::types::ValueRef::Integer(v) if ids[i] => (v as u64).to_string(),
                        rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                        rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into_owned(),
                        other => panic!("unexpected value {other:?} in {table}"),
                    })
                    .collect();
                Ok(fields.join(","))
            })
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        tables.insert(table.to_string(), sorted_unless(order, rows));
    }
    for key in META {
        let value: Option<String> = conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).ok();
        tables.insert(format!("meta {key}"), value.into_iter().collect());
    }
    tables
}

fn sorted_unless(order: &str, mut rows: Vec<String>) -> Vec<String> {
    if order.is_empty() {
        rows.sort();
    }
    rows
}

/// The first differences, table by table, so that a failure says what went wrong.
fn assert_same_tables(store: &Path, url: &str, what: &str) {
    let (want, got) = (store_tables(store), postgres_tables(url));
    assert!(want["ad_minute"].len() > 10 && !want["changelog"].is_empty(), "{what}: the store holds too little to compare");
    for (table, rows) in &want {
        let theirs = &got[table];
        if rows != theirs {
            let first = rows.iter().zip(theirs).position(|(a, b)| a != b).unwrap_or(rows.len().min(theirs.len()));
            panic!(
                "{what}: {table} differs: the store has {} rows, PostgreSQL {}; first difference at row {first}: {:?} vs {:?}",
                rows.len(),
                theirs.len(),
                rows.get(first),
                theirs.get(first)
            );
        }
    }
}

fn pg_frontier(url: &str) -> Option<u64> {
    let mut client = client(url).ok()?;
    let row = client.query_opt("SELECT value FROM clickagg_meta WHERE key = 'frontier'", &[]).ok()??;
    row.get::<_, String>(0).parse().ok()
}

/// PostgreSQL's committed position, as [`store_position`] reads the store's: its frontier and
/// the sum of its partitions' offsets.
fn pg_position(url: &str) -> Option<(u64, u64)> {
    let mut client = client(url).ok()?;
    let row = client.query_one("SELECT coalesce(sum(\"offset\"), 0)::bigint FROM partitions", &[]).ok()?;
    Some((pg_frontier(url)?, row.get::<_, i64>(0) as u64))
}

/// A run stopped at any moment leaves PostgreSQL at or ahead of the store: it commits first, and
/// may be an advance or two ahead while the store's thread catches up.
fn assert_not_behind(store: &Path, url: &str) {
    let (theirs, mine) = (pg_frontier(url), store_position(store).map(|p| p.0));
    assert!(theirs >= mine, "PostgreSQL ({theirs:?}) is behind the store ({mine:?})");
}

fn replay_args<'a>(logs: &'a Path, store: &'a Path, url: &'a str) -> Vec<&'a str> {
    let mut args = vec!["run", "--logs", s(logs), "--store", s(store), "--sink", url, "-w", "2"];
    args.extend(SETTINGS);
    args
}

#[test]
fn a_replay_commits_the_same_tables_to_postgres_as_to_the_store() {
    let server = Postgres::start();
    let url = server.database("replay");
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&logs, 40_000, 3, 12, 3);
    let store = dir.path().join("answers.db");
    run_ok(&replay_args(&logs, &store, &url));
    assert_same_tables(&store, &url, "replay");
    assert_same_outputs(&clean_replay(&logs), &export(&store), "store export vs run --out");
}

/// Follows `logs` (which do not grow) until the store has committed all of it, then stops.
fn follow_to_the_end(logs: &Path, store: &Path, url: &str) {
    stop_when_caught_up(start_follower(logs, store, &["--sink", url]), logs, store);
}

/// The one moment PostgreSQL is ahead of the store: a crash after its commit and before the
/// store's. The restarted run re-sends that advance; PostgreSQL must take none of it twice.
#[test]
fn a_crash_between_the_two_commits_writes_nothing_twice() {
    let server = Postgres::start();
    let url = server.database("between");
    let dir = tempfile::tempdir().unwrap();
    let (source, logs) = (dir.path().join("source"), dir.path().join("logs"));
    generate(&source, 40_000, 3, 12, 5);
    let store = dir.path().join("answers.db");
    let writer = Writer::start(&source, &logs, 3, 100, Duration::from_millis(40));
    let mut args = vec!["run", "--logs", s(&logs), "--store", s(&store), "--sink", &url, "--follow", "-w", "2"];
    args.extend(SETTINGS);
    let mut follower = clickagg()
        .args(&args)
        .env("CLICKAGG_FAULT_CRASH_AFTER_MIRROR_COMMITS", "3")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while follower.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(60) {
            follower.kill().unwrap();
            panic!("the injected crash did not happen within a minute");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut stderr = String::new();
    std::io::Read::read_to_string(follower.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("fault injected"), "the follower stopped otherwise: {stderr}");
    // One advance ahead: a later frontier, or the same one with more of the logs read (an
    // advance of the partitions' offsets alone, committed while no minute moved).
    let (theirs, mine) = (pg_position(&url).expect("PostgreSQL committed"), store_position(&store));
    assert!(mine.is_some_and(|mine| theirs > mine), "PostgreSQL {theirs:?} should be one advance ahead of the store {mine:?}");
    writer.join();
    follow_to_the_end(&logs, &store, &url);
    assert_not_behind(&store, &url);
    run_ok(&replay_args(&logs, &store, &url));
    assert_same_tables(&store, &url, "after a crash between the commits and a finishing replay");
    assert_same_outputs(&clean_replay(&logs), &export(&store), "store export vs run --out");
}

#[test]
fn kill_9_while_following_leaves_postgres_equal_to_the_store() {
    let server = Postgres::start();
    let url = server.database("follow");
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    let logs = dir.path().join("logs");
    let store = dir.path().join("answers.db");
    generate(&source, 40_000, 4, 20, 17);
    let writer = Writer::start(&source, &logs, 9, 150, Duration::from_millis(25));
    let kills = kill_at_random_moments(|| writer.is_done(), 8, 77, 200, || start_follower(&logs, &store, &["--sink", &url]), || {});
    writer.join();
    follow_to_the_end(&logs, &store, &url);
    assert_not_behind(&store, &url);
    run_ok(&replay_args(&logs, &store, &url));
    assert_same_tables(&store, &url, &format!("after {kills} SIGKILLs and a finishing replay"));
    assert_same_outputs(&clean_replay(&logs), &export(&store), "store export vs run --out");
}

#[test]
fn a_database_that_does_not_match_the_store_is_refused() {
    let server = Postgres::start();
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&logs, 5_000, 2, 5, 1);
    let path = |name: &str| -> PathBuf { dir.path().join(name) };

    let mut args = vec!["run", "--logs", s(&logs), "--sink", "postgres://clickagg@127.0.0.1:1/x"];
    args.extend(SETTINGS);
    assert!(run_err(&args).contains("add --store PATH"));
    let url = server.database("refusals");
    let a = path("a.db");
    let mut args = vec!["run", "--logs", s(&logs), "--store", s(&a), "--sink", "mysql://x"];
    args.extend(SETTINGS);
    assert!(run_err(&args).contains("postgres://"));

    // TLS asked for, from a server without it; and no password in any message.
    let plain = format!("postgres://clickagg:s3cret@127.0.0.1:{}/refusals?sslmode=require", server.port);
    let refused = run_err(&replay_args(&logs, &path("tls.db"), &plain));
    assert!(refused.contains("server does not support TLS"), "{refused}");
    assert!(refused.contains("clickagg:***@127.0.0.1") && !refused.contains("s3cret"), "{refused}");
    let with_query = format!("postgres://clickagg@127.0.0.1:{}/refusals?password=s3cret&sslmode=verify-full", server.port);
    let refused = run_err(&replay_args(&logs, &path("tls.db"), &with_query));
    assert!(refused.contains("password=***") && !refused.contains("s3cret"), "{refused}");
    let mut args = vec!["run", "--logs", s(&logs), "--store", s(&a), "--sink", "host=db password=s3cret"];
    args.extend(SETTINGS);
    let refused = run_err(&args);
    assert!(refused.contains("password=***") && !refused.contains("s3cret"), "{refused}");
    assert!(!path("tls.db").exists() || store_position(&path("tls.db")).is_none(), "a refused sink commits nothing");

    // Nothing listens on this port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let unreachable = format!("postgres://clickagg@127.0.0.1:{closed}/clickagg");
    assert!(run_err(&replay_args(&logs, &path("b.db"), &unreachable)).contains("PostgreSQL sink"));

    // Another writer holds the database.
    let mut other = client(&url).unwrap();
    other.query_one("SELECT pg_advisory_lock(7164216982963840871)", &[]).unwrap();
    assert!(run_err(&replay_args(&logs, &path("c.db"), &url)).contains("another clickagg"));
    drop(other);

    // A store stopped part-way, to resume.
    follow_to_the_end(&logs, &path("d.db"), &url);
    // A new store, but the database holds another store's answers.
    assert!(run_err(&replay_args(&logs, &path("e.db"), &url)).contains("another store"));
    // The store resumed against an empty database.
    let empty = server.database("empty");
    assert!(run_err(&replay_args(&logs, &path("d.db"), &empty)).contains("behind the store"));
    // Other settings.
    let f = path("f.db");
    let mut args = vec!["run", "--logs", s(&logs), "--store", s(&f), "--sink", &url, "--tick", "1s", "--windows", "1m"];
    args.extend(["--allowed-lateness", "1m", "--max-clicks-per-minute", "40"]);
    assert!(run_err(&args).contains("other settings"));
    // And the refusals wrote nothing: the stopped run resumes and ends equal.
    run_ok(&replay_args(&logs, &path("d.db"), &url));
    assert_same_tables(&path("d.db"), &url, "after the refusals");
}

/// `sslmode=require` and the verifying modes against a server that takes TLS connections only
/// (so a run that mirrors at all went over TLS); a certificate that does not verify, and a plain
/// connection, are refused with a message that says so.
#[test]
fn tls_is_used_when_the_url_asks_for_it() {
    let server = Postgres::start_tls();
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    generate(&logs, 20_000, 2, 8, 9);
    let store = |name: &str| dir.path().join(name);

    let url = server.database("required");
    run_ok(&replay_args(&logs, &store("a.db"), &format!("{url}?sslmode=require")));
    assert_same_tables(&store("a.db"), &url, "over TLS (sslmode=require)");

    // Verified: by the certificate as root, under both names it holds.
    let root = server.certificate();
    for (database, host) in [("full_by_name", "localhost"), ("full_by_ip", "127.0.0.1")] {
        server.database(database);
        let url = format!("postgres://clickagg@{host}:{}/{database}?sslmode=verify-full&sslrootcert={}", server.port, s(&root));
        run_ok(&replay_args(&logs, &store(&format!("{database}.db")), &url));
        assert_same_tables(&store(&format!("{database}.db")), &server.url(database), &format!("over TLS, verified as {host}"));
    }
    let url = server.database("ca");
    run_ok(&replay_args(&logs, &store("ca.db"), &format!("{url}?sslmode=verify-ca&sslrootcert={}", s(&root))));
    assert_same_tables(&store("ca.db"), &url, "over TLS (verify-ca)");

    // A self-signed certificate does not verify against the system's roots.
    let refused = run_err(&replay_args(&logs, &store("b.db"), &format!("{url}?sslmode=verify-full")));
    assert!(refused.contains("PostgreSQL sink") && refused.contains("certificate verify failed"), "{refused}");
    let missing = run_err(&replay_args(&logs, &store("b.db"), &format!("{url}?sslmode=verify-full&sslrootcert=/nonexistent.pem")));
    assert!(missing.contains("cannot read sslrootcert /nonexistent.pem"), "{missing}");
    // Without TLS the server refuses.
    let refused = run_err(&replay_args(&logs, &store("b.db"), &format!("{url}?sslmode=disable")));
    assert!(refused.contains("no encryption"), "{refused}");
}
