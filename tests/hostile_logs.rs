//! Logs written by thousands of servers include every kind of garbage. None of it may crash a
//! run, grow its memory, or vanish: each line is a click or a dead-letter row with a reason.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::process::Command;

use clickagg::source::parse::MAX_LINE_BYTES;
use clickagg::source::reader::{Line, LineReader};
use common::read_outputs;

/// `len` bytes of `fill`, then `tail`, produced on the fly: a huge file that is never stored.
struct Endless {
    left: u64,
    fill: u8,
    tail: std::io::Cursor<Vec<u8>>,
}

impl Read for Endless {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return self.tail.read(buf);
        }
        let n = buf.len().min(self.left as usize);
        buf[..n].fill(self.fill);
        self.left -= n as u64;
        Ok(n)
    }
}

/// Peak resident memory of this process so far, in bytes (Linux).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

const GIB: u64 = 1 << 30;

#[test]
fn a_gigabyte_line_is_dead_lettered_in_bounded_memory() {
    let before = peak_rss();
    for (tail, file_is_final) in [(b"\ne2,1,2,3,4,1.1.1.1,US\n".to_vec(), false), (Vec::new(), true)] {
        let mut reader = LineReader::new(Endless { left: GIB, fill: b'x', tail: std::io::Cursor::new(tail.clone()) }, 0);
        match reader.next_line(file_is_final).unwrap() {
            Some(Line::TooLong { offset: 0, prefix }) => {
                assert!(prefix.len() <= MAX_LINE_BYTES && prefix.iter().all(|&b| b == b'x'));
            }
            other => panic!("expected the 1 GiB line as too long, got {other:?}"),
        }
        if tail.is_empty() {
            assert_eq!(reader.next_line(true).unwrap(), None);
            assert_eq!(reader.offset(), GIB);
        } else {
            assert_eq!(reader.next_line(false).unwrap(), Some(Line::Complete { offset: GIB + 1, bytes: b"e2,1,2,3,4,1.1.1.1,US" }));
        }
    }
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < 64 << 20, "reading a 1 GiB line raised peak memory by {} MiB", grown >> 20);
}

const HEADER: &[u8] = b"event_id,ts,ad_id,campaign_id,user_id,ip,country\n";

fn line(id: u32, minute: u64) -> Vec<u8> {
    format!("ev{id},{},{},{},{},10.0.{}.{},US\n", 1_767_225_600_000 + minute * 60_000 + id as u64, id % 7, id % 3, id, id % 250, id % 200)
        .into_bytes()
}

fn good_lines(n: u32) -> Vec<u8> {
    (0..n).flat_map(|i| line(i, (i / 10) as u64)).collect()
}

#[test]
fn garbage_in_every_form_becomes_dead_letters_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut garbage: Vec<u8> = (0..20_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    garbage.push(b'\n');
    let files: BTreeMap<&str, Vec<u8>> = BTreeMap::from([
        ("part-00000.csv", [HEADER, &garbage].concat()),
        ("part-00001.csv", [HEADER, b"ev1\0,1767225600000,1,1,1,1.1.1.1,US\n\0\0\0\n\0,\0,\0,\0,\0,\0,\0\n", &good_lines(5)].concat()),
        ("part-00002.csv", [b"event_id,ts,ad_id,user_id,ip,country\n".as_slice(), &good_lines(4)].concat()),
        ("part-00003.csv", [b"event_id,ts,ts,ad_id,campaign_id,user_id,ip,country\n".as_slice(), &good_lines(3)].concat()),
        ("part-00004.csv", Vec::new()),
        ("part-00005.csv", HEADER.to_vec()),
        ("part-00006.csv", [HEADER, &good_lines(50), &vec![b'y'; 5 << 20], b"\n", &line(999, 4)].concat()),
        ("part-00007.csv", [HEADER, &good_lines(8)[..40]].concat()),
    ]);
    for (name, bytes) in &files {
        std::fs::write(logs.join(name), bytes).unwrap();
    }
    let out = dir.path().join("out");
    let result = Command::new(env!("CARGO_BIN_EXE_clickagg"))
        .args(["run", "--logs", logs.to_str().unwrap(), "--out", out.to_str().unwrap(), "-w", "2", "--summary", "--dead-letter-bad-headers"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "the run failed: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let outputs = read_outputs(&out);
    let dead: Vec<Vec<String>> = outputs["dead_letter.csv"]
        .lines()
        .skip(1)
        .map(|l| l.splitn(4, ',').map(str::to_string).collect())
        .collect();
    let reasons_of = |partition: &str| -> Vec<String> {
        dead.iter().filter(|r| r[0] == partition).map(|r| r[2].clone()).collect()
    };
    // Binary garbage: one dead letter per line of it, none lost.
    let garbage_lines = garbage.iter().filter(|&&b| b == b'\n').count();
    assert_eq!(reasons_of("part-00000.csv").len(), garbage_lines);
    // Lines of NUL bytes are not clicks; an event_id with a NUL in it is (SPEC: 1–64 bytes, no
    // comma), and the good lines after them count.
    assert_eq!(reasons_of("part-00001.csv"), vec!["missing_field", "bad_ts"]);
    // A header missing a column, or naming one twice: the header and every line dead-lettered.
    assert_eq!(reasons_of("part-00002.csv"), vec!["bad_header"; 5]);
    assert_eq!(reasons_of("part-00003.csv"), vec!["bad_header"; 4]);
    // An empty file and a header-only file are partitions with nothing yet.
    assert!(reasons_of("part-00004.csv").is_empty() && reasons_of("part-00005.csv").is_empty());
    // A 5 MiB line is one dead letter, with only its first bytes kept.
    assert_eq!(reasons_of("part-00006.csv"), vec!["line_too_long"]);
    let long = dead.iter().find(|r| r[2] == "line_too_long").unwrap();
    assert!(long[3].len() <= MAX_LINE_BYTES + 2, "the dead letter kept {} bytes", long[3].len());
    // A cut-off last line is reported, not dropped.
    assert_eq!(reasons_of("part-00007.csv"), vec!["unterminated_line"]);
    // Everything else was counted, once: the good lines of partitions 1, 6 and 7 repeat ev0..ev4
    // (deliveries of the same clicks), so the distinct clicks are ev0..ev49, ev1\0 and ev999.
    let clicks: u64 = outputs["ad_minute.csv"].lines().skip(1).map(|l| l.rsplit(',').next().unwrap().parse::<u64>().unwrap()).sum();
    let good = 50 + 1 + 1;
    assert_eq!(clicks, good, "the good lines among the garbage were not all counted");
}

#[test]
fn a_missing_log_directory_and_an_unreadable_partition_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let result = Command::new(env!("CARGO_BIN_EXE_clickagg"))
        .args(["run", "--logs", dir.path().join("nope").to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success() && stderr.contains("cannot read the log directory"), "{stderr}");

    // Something named like a partition that is not a file: the run says which and fails.
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(logs.join("part-00001.csv")).unwrap();
    std::fs::write(logs.join("part-00000.csv"), [HEADER, &good_lines(3)].concat()).unwrap();
    let result = Command::new(env!("CARGO_BIN_EXE_clickagg"))
        .args(["run", "--logs", logs.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success() && stderr.contains("part-00001.csv"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A partition whose header names no usable columns fails the run before it starts, saying
/// which partition and what to do; it does not exit 0 with every line dead-lettered.
#[test]
fn an_unusable_header_fails_the_run_unless_dead_lettering_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    std::fs::write(logs.join("part-00000.csv"), [HEADER, &good_lines(3)].concat()).unwrap();
    std::fs::write(logs.join("part-00001.csv"), [b"id,when,ad\n".as_slice(), &good_lines(3)].concat()).unwrap();
    let out = dir.path().join("out");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_clickagg"))
            .args(["run", "--logs", logs.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = run(&[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a bad header ran to the end: {stderr}");
    assert!(stderr.contains("part-00001.csv: the header lacks column(s)") && stderr.contains("--dead-letter-bad-headers"), "{stderr}");
    assert!(!out.join("ad_minute.csv").exists(), "the refused run wrote answers");

    let accepted = run(&["--dead-letter-bad-headers"]);
    let stderr = String::from_utf8_lossy(&accepted.stderr);
    assert!(accepted.status.success(), "{stderr}");
    assert!(stderr.contains("warning: part-00001.csv"), "{stderr}");
    let dead = std::fs::read_to_string(out.join("dead_letter.csv")).unwrap();
    assert_eq!(dead.lines().filter(|l| l.starts_with("part-00001.csv,") && l.contains(",bad_header,")).count(), 4, "{dead}");
}
