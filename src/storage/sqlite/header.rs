//! The SQLite header's page count, to refuse a store cut short.

use std::path::Path;

/// A store cut short (a disk that lost its tail, a partial copy) can still answer the first pages
/// it is asked for. The header says how many pages the file held at its last checkpoint; a file
/// shorter than that lost some. Reading the header is O(1), where `PRAGMA quick_check` would read
/// the whole store and make recovery time grow with the log's length.
///
/// Not while the write-ahead log holds frames: a checkpoint copies the newest page 1 (with the
/// new page count) into the file before the pages after it, so a process killed part-way through
/// one leaves a file shorter than its header says, and the log still holds every page missing.
/// SQLite finishes that checkpoint from the log at the next open.
pub(super) fn check_length(path: &Path) -> Result<(), String> {
    use std::io::Read;
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    if std::fs::metadata(Path::new(&wal)).is_ok_and(|m| m.len() > 0) {
        return Ok(());
    }
    let mut header = [0u8; 100];
    let mut file = std::fs::File::open(path).map_err(|e| format!("cannot read the store {}: {e}", path.display()))?;
    let len = file.metadata().map_err(|e| format!("cannot read the store {}: {e}", path.display()))?.len();
    if file.read_exact(&mut header).is_err() {
        return Err(format!("the store {} is {len} bytes, shorter than an SQLite header; it was left as it is", path.display()));
    }
    let be32 = |at: usize| u32::from_be_bytes(header[at..at + 4].try_into().expect("four bytes"));
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65_536,
        size => u64::from(size),
    };
    // The page count is valid only when the change counter matches "version valid for".
    let pages = if be32(24) == be32(92) { u64::from(be32(28)) } else { 0 };
    if len < pages * page_size {
        return Err(format!(
            "the store {} is damaged: it is {len} bytes but its header says {} pages of {page_size} bytes; \
             it was cut short, and was left as it is (restore it from a copy, or start a new store)",
            path.display(),
            pages
        ));
    }
    Ok(())
}
