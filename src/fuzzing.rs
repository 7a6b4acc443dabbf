//! Entry points for the fuzz targets in `fuzz/`, shared with `tests/fuzz_corpus.rs`, which
//! replays every corpus file through them in the normal test suite. Each takes arbitrary bytes,
//! must never panic, and checks what must hold of whatever the parser accepts.

use std::io::Cursor;

use crate::source::parse::{Header, LineParser, MAX_LINE_BYTES};
use crate::source::reader::{Line, LineReader};

/// A whole log file: the first line is the header, the rest are lines to parse. Every line
/// comes out exactly once, as a click or a reason, and no more than the limit of it is kept.
pub fn log_file(data: &[u8]) {
    let mut reader = LineReader::new(Cursor::new(data), 0);
    let mut parser: Option<LineParser> = None;
    let mut header_error = false;
    let mut last_end = 0u64;
    while let Some(line) = reader.next_line(true).expect("reading from memory cannot fail") {
        let (offset, bytes, kept_whole) = match line {
            Line::Complete { offset, bytes } => (offset, bytes, true),
            Line::TooLong { offset, prefix } => {
                assert!(prefix.len() <= MAX_LINE_BYTES, "an overlong line kept {} bytes", prefix.len());
                (offset, prefix, false)
            }
            Line::Unterminated { offset, bytes } => (offset, bytes, true),
        };
        assert!(offset >= last_end, "lines went backwards: {offset} < {last_end}");
        if kept_whole {
            assert_eq!(&data[offset as usize..offset as usize + bytes.len()], bytes, "a line is not the file's bytes");
        }
        last_end = offset + bytes.len() as u64;
        match (&mut parser, header_error) {
            (None, false) => match Header::parse(bytes) {
                Ok(header) => parser = Some(LineParser::new(header)),
                Err(_) => header_error = true,
            },
            (Some(parser), _) if kept_whole => {
                if let Ok(click) = parser.parse(bytes) {
                    assert!(click.attrs.country.to_string().chars().all(|c| c.is_ascii_uppercase()));
                }
            }
            _ => {}
        }
    }
    assert_eq!(reader.offset(), data.len() as u64, "the reader stopped before the end");
}

/// One header line.
pub fn header(data: &[u8]) {
    if let Ok(header) = Header::parse(data) {
        // A header that parses gives a parser that handles any line.
        let mut parser = LineParser::new(header);
        let _ = parser.parse(b"a,1,2,3,4,1.2.3.4,US");
        let _ = parser.parse(data);
    }
}

/// Durations and window lists, as given on the command line.
pub fn durations(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(ms) = crate::config::parse_duration_ms(text) {
        assert_eq!(crate::config::parse_duration_ms(&format!("{ms}ms")), Ok(ms), "{text:?} does not round-trip");
    }
    if let Ok(windows) = crate::config::parse_windows(text) {
        assert!(windows.iter().all(|&w| w > 0), "{text:?} gave a zero window");
    }
}

/// Query strings and the minutes and filters in them, as the server takes them.
pub fn query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = crate::serve::params::parse_query(text);
    if let Ok(minute) = crate::serve::params::parse_minute(text) {
        assert_eq!(crate::serve::params::parse_minute(&minute.to_string()), Ok(minute));
    }
}

/// Hostfiles and the cluster greeting line.
pub fn cluster_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(addresses) = crate::cluster::parse_hostfile(text) {
        assert!(!addresses.is_empty() && addresses.iter().all(|a| a.contains(':') && !a.contains(' ')));
    }
    let _ = crate::cluster::decode_greeting(text);
}
