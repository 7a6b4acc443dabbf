//! Parsing of the command line's value types.

/// What every duration message ends with.
const DURATION_FORMS: &str = "expected a number and a unit, like 500ms, 5s, 5m or 1h";

/// Parses a duration with a unit, `500ms`, `5s`, `5m`, `1h` (or `jiff`'s longer forms:
/// `1h 30m`, `90 seconds`, `1.5s`), into milliseconds. A bare number is refused (is `5` seconds
/// or minutes?), and so are negative durations and parts of a millisecond.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err(format!("an empty duration: {DURATION_FORMS}"));
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("'{text}' needs a unit: ms, s, m or h (e.g. {text}s)"));
    }
    let duration: jiff::SignedDuration =
        text.parse().map_err(|e| format!("'{text}' is not a duration ({e}); {DURATION_FORMS}"))?;
    if duration.is_negative() {
        return Err(format!("'{text}' is negative; {DURATION_FORMS}"));
    }
    if duration.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!("'{text}' is not a whole number of milliseconds"));
    }
    u64::try_from(duration.as_millis()).map_err(|_| format!("'{text}' is too long a duration"))
}

/// Parses a list of sliding windows, `1m,5m,60m` (or `1h`), into whole minutes.
pub fn parse_windows(text: &str) -> Result<Vec<u32>, String> {
    let mut windows = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let ms = parse_duration_ms(part)?;
        if ms == 0 || ms % 60_000 != 0 || ms / 60_000 > u32::MAX as u64 {
            return Err(format!("window '{part}' must be a whole number of minutes, at least one"));
        }
        windows.push((ms / 60_000) as u32);
    }
    Ok(windows)
}

/// Reads a blocklist: one IP or CIDR network per line; blank lines and `#` comments ignored.
pub fn read_blocklist(path: &std::path::Path) -> Result<Vec<clickagg_dataflows::IpNet>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read blocklist {}: {e}", path.display()))?;
    let mut networks = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if !line.is_empty() {
            networks.push(
                clickagg_dataflows::IpNet::parse(line)
                    .map_err(|e| format!("blocklist {} line {}: {e}", path.display(), number + 1))?,
            );
        }
    }
    Ok(networks)
}

#[cfg(test)]
mod tests {
    use super::{parse_duration_ms, parse_windows, read_blocklist};

    #[test]
    fn blocklists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("block.txt");
        std::fs::write(&path, "# bots\n203.0.113.0/24\n\n2001:db8::1  # one host\n").unwrap();
        assert_eq!(read_blocklist(&path).unwrap().len(), 2);
        std::fs::write(&path, "10.0.0.0/8\n300.1.1.1\n").unwrap();
        assert!(read_blocklist(&path).unwrap_err().contains("line 2"));
        assert!(read_blocklist(&dir.path().join("missing")).unwrap_err().contains("cannot read blocklist"));
    }

    #[test]
    fn windows() {
        assert_eq!(parse_windows("1m,5m,60m"), Ok(vec![1, 5, 60]));
        assert_eq!(parse_windows("1h, 2m"), Ok(vec![60, 2]));
        assert_eq!(parse_windows(""), Ok(vec![]));
        assert!(parse_windows("30s").is_err());
        assert!(parse_windows("0m").is_err());
        assert!(parse_windows("5").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("5s"), Ok(5_000));
        assert_eq!(parse_duration_ms("5m"), Ok(300_000));
        assert_eq!(parse_duration_ms("1h"), Ok(3_600_000));
        assert_eq!(parse_duration_ms("0s"), Ok(0));
        assert_eq!(parse_duration_ms(" 250ms "), Ok(250));
        assert_eq!(parse_duration_ms("1h 30m"), Ok(5_400_000));
        assert_eq!(parse_duration_ms("1.5s"), Ok(1_500));
        for bad in ["", "5", "s", "5x", "-5s", "1.5ms", "99999999999999999999s", "5s5"] {
            let error = parse_duration_ms(bad).expect_err(bad);
            assert!(error.contains(bad.trim()) || bad.is_empty(), "{bad:?}: {error}");
        }
        assert!(parse_duration_ms("5").unwrap_err().contains("needs a unit"));
        assert!(parse_duration_ms("5x").unwrap_err().contains("like 500ms, 5s, 5m or 1h"));
    }
}
