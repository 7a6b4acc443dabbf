//! Checks made before any worker starts, so that a run that cannot mean what the user wants
//! fails at once with a sentence instead of exiting 0 with every line dead-lettered:
//!
//! - a log directory with no partition files is an error that names the expected pattern
//!   (follow mode waits for them instead, as a streaming job waits for its source);
//! - a partition whose header cannot be used is an error, unless the user asked for such
//!   partitions to be dead-lettered (`--dead-letter-bad-headers`, the old behaviour);
//! - timestamps that look like seconds, not milliseconds, get a warning (they are valid input,
//!   but almost certainly a mistake: a 2024 time in seconds reads as January 1970).
//!
//! Only the start of each file is read: the first line, and a few data lines after it.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::parse::{Header, LineParser};
use super::partition_name;

/// What the checks found that is worth saying but does not stop the run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Warnings(pub Vec<String>);

/// How much of each partition the checks read at most.
const PEEK_BYTES: u64 = 64 * 1024;
/// Data lines sampled per partition for the seconds check.
const SAMPLED_LINES: usize = 32;
/// A ts below this (1973-03-03 as milliseconds; the year 5138 as seconds) is taken for seconds.
const SECONDS_THRESHOLD: u64 = 100_000_000_000;

/// Checks `paths`, the partitions listed in `dir`. `follow`: files may still be being written,
/// so an empty directory or a header without its newline yet are not errors.
pub fn check_partitions(dir: &Path, paths: &[PathBuf], follow: bool, dead_letter_bad_headers: bool) -> Result<Warnings, String> {
    let mut warnings = Warnings::default();
    if paths.is_empty() {
        let message = format!(
            "no partition files in {}: expected files named part-NNNNN.csv (part-00000.csv, part-00001.csv, …), \
             one per partition, each starting with a header line",
            dir.display()
        );
        if !follow {
            return Err(message);
        }
        warnings.0.push(format!("{message}; waiting for them to appear"));
        return Ok(warnings);
    }
    let mut bad_headers = Vec::new();
    for path in paths {
        let start = read_start(path)?;
        let Some(header_end) = start.iter().position(|&b| b == b'\n') else {
            // Empty, or a header still being written: nothing to check yet. In a replay an
            // unterminated lone line is the partition's only line, and is dead-lettered as such.
            continue;
        };
        let header = strip_cr(&start[..header_end]);
        match Header::parse(header) {
            Ok(header) => {
                if let Some(ts) = seconds_like_ts(header, &start[header_end + 1..]) {
                    warnings.0.push(format!(
                        "{}: timestamps look like seconds, not milliseconds (ts {ts} read as milliseconds is {}); \
                         SPEC's ts is milliseconds since the Unix epoch",
                        partition_name(path),
                        rfc3339_ms(ts)
                    ));
                }
            }
            Err(reason) => bad_headers.push(format!("{}: {reason}", partition_name(path))),
        }
    }
    if bad_headers.is_empty() {
        return Ok(warnings);
    }
    if dead_letter_bad_headers {
        for bad in bad_headers {
            warnings.0.push(format!("{bad}; its lines go to the dead letter as bad_header"));
        }
        return Ok(warnings);
    }
    Err(format!(
        "unusable header in {} partition(s): {}. A header names the columns event_id, ts, ad_id, campaign_id, \
         user_id, ip, country (any order); fix the files, or pass --dead-letter-bad-headers to dead-letter \
         every line of such partitions and go on",
        bad_headers.len(),
        bad_headers.join("; ")
    ))
}

fn read_start(path: &Path) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open partition {}: {e}", path.display()))?;
    let mut start = Vec::new();
    file.take(PEEK_BYTES).read_to_end(&mut start).map_err(|e| format!("cannot read partition {}: {e}", path.display()))?;
    Ok(start)
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The first sampled ts that looks like seconds, when most sampled clicks' ts do.
fn seconds_like_ts(header: Header, data: &[u8]) -> Option<u64> {
    let mut parser = LineParser::new(header);
    let complete = &data[..data.iter().rposition(|&b| b == b'\n').map_or(0, |end| end + 1)];
    let timestamps: Vec<u64> = complete
        .split(|&b| b == b'\n')
        .map(strip_cr)
        .filter_map(|line| parser.parse(line).ok().map(|click| click.key.ts))
        .take(SAMPLED_LINES)
        .collect();
    let small: Vec<u64> = timestamps.iter().copied().filter(|&ts| ts < SECONDS_THRESHOLD).collect();
    (!small.is_empty() && small.len() * 2 > timestamps.len()).then(|| small[0])
}

/// `ms` since the epoch as an RFC 3339 UTC time with milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "event_id,ts,ad_id,campaign_id,user_id,ip,country\n";

    fn logs(files: &[(&str, String)]) -> (tempfile::TempDir, Vec<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
            paths.push(dir.path().join(name));
        }
        (dir, paths)
    }

    #[test]
    fn an_empty_directory_fails_a_replay_and_names_the_pattern() {
        let (dir, paths) = logs(&[]);
        let error = check_partitions(dir.path(), &paths, false, false).unwrap_err();
        assert!(error.contains("no partition files") && error.contains("part-NNNNN.csv"), "{error}");
        let warnings = check_partitions(dir.path(), &paths, true, false).unwrap();
        assert!(warnings.0[0].contains("waiting for them"), "{warnings:?}");
    }

    #[test]
    fn an_unusable_header_fails_unless_dead_lettering_was_asked_for() {
        let good = format!("{HEADER}e1,1767225600000,1,2,3,1.2.3.4,US\n");
        let (dir, paths) = logs(&[("part-00000.csv", good), ("part-00001.csv", "event_id,ts,ad\ne,1,2\n".into())]);
        let error = check_partitions(dir.path(), &paths, false, false).unwrap_err();
        assert!(error.contains("part-00001.csv: the header lacks column(s) ad_id, campaign_id"), "{error}");
        assert!(error.contains("--dead-letter-bad-headers"), "{error}");
        let warnings = check_partitions(dir.path(), &paths, false, true).unwrap();
        assert_eq!(warnings.0.len(), 1);
        assert!(warnings.0[0].contains("part-00001.csv") && warnings.0[0].contains("bad_header"), "{warnings:?}");
    }

    #[test]
    fn empty_and_header_only_partitions_pass() {
        let (dir, paths) = logs(&[("part-00000.csv", String::new()), ("part-00001.csv", HEADER.into())]);
        assert_eq!(check_partitions(dir.path(), &paths, false, false).unwrap(), Warnings::default());
    }

    #[test]
    fn timestamps_in_seconds_are_warned_about_and_milliseconds_are_not() {
        let seconds = format!("{HEADER}e1,1767225600,1,2,3,1.2.3.4,US\ne2,1767225601,1,2,3,1.2.3.4,US\n");
        let millis = format!("{HEADER}e1,1767225600000,1,2,3,1.2.3.4,US\r\n");
        let (dir, paths) = logs(&[("part-00000.csv", seconds), ("part-00001.csv", millis)]);
        let warnings = check_partitions(dir.path(), &paths, false, false).unwrap();
        assert_eq!(warnings.0.len(), 1, "{warnings:?}");
        assert!(warnings.0[0].starts_with("part-00000.csv: timestamps look like seconds"), "{warnings:?}");
        assert!(warnings.0[0].contains("1970-01-21T10:53:45.600Z"), "{warnings:?}");
    }

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_767_225_600_000), "2026-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
    }
}
