//! Where each partition that is not a file ends, as its reader last saw it: the high watermark
//! of a Kafka topic partition (the offset its next message will get). A file's end is its size,
//! which the server reads from the file itself; a topic partition's only its reader's client
//! knows, so the reader records it here and `/v1/status` and `/metrics` read it to report lag
//! in messages.

use std::collections::BTreeMap;
use std::sync::Mutex;

static ENDS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// Records that partition `name` ends at `end` (its next message's offset).
pub fn record_end(name: &str, end: u64) {
    if let Ok(mut ends) = ENDS.lock() {
        match ends.get_mut(name) {
            Some(known) => *known = end,
            None => {
                ends.insert(name.to_string(), end);
            }
        }
    }
}

/// Where partition `name` ended when its reader last looked, if it is one that records it.
pub fn end_of(name: &str) -> Option<u64> {
    ENDS.lock().ok()?.get(name).copied()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_latest_end_recorded_is_the_one_read() {
        assert_eq!(super::end_of("positions-test-0"), None);
        super::record_end("positions-test-0", 10);
        super::record_end("positions-test-0", 12);
        assert_eq!(super::end_of("positions-test-0"), Some(12));
    }
}
