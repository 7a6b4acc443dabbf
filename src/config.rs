//! Parsing of the command line's value types.

/// Parses a duration with a unit: `500ms`, `5s`, `5m`, `1h`, into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(format!("'{text}' is not a duration: expected a number and a unit, like 500ms, 5s, 5m or 1h"));
    }
    let number: u64 = number.parse().map_err(|_| format!("'{text}': the number is too large"))?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "" => return Err(format!("'{text}' needs a unit: ms, s, m or h (e.g. {text}s)")),
        other => return Err(format!("'{text}': unknown unit '{other}', expected ms, s, m or h")),
    };
    number.checked_mul(scale).ok_or_else(|| format!("'{text}' is too long a duration"))
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
        for bad in ["", "5", "s", "5x", "-5s", "5 s", "99999999999999999999s"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad} should not parse");
        }
    }
}
