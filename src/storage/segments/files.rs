//! The segment files and the index of the minutes in them, shared by the one writer (the commit
//! thread) and the readers (the server's threads).
//!
//! Minutes are appended to a segment file, `segment-NNNNNN`, each minute's bytes once and
//! never changed. A file is created sparse at its full size ([`SEGMENT_BYTES`], or one
//! minute's size when that is larger) and mapped read-only at that size once; the writer
//! writes through the file (`pwrite`), and a minute's entry enters the index only once its
//! bytes are written, so a reader never looks at bytes being written. Only the bytes written
//! take disk space. The maps are of files this process created in a directory of its own:
//! nothing else writes to them or cuts them short.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use memmap2::Mmap;

use super::format::MinuteEntry;

/// The size a segment file is created at (sparse: only what is written takes disk space). A
/// day at the design's 1 billion clicks writes some tens of GiB, so a year is some tens of
/// thousands of maps, within Linux's default limit of 65,530 per process.
pub const SEGMENT_BYTES: u64 = 1 << 30;

/// The index and the maps: what a reader needs to find a minute's bytes.
#[derive(Default)]
pub struct Index {
    /// Every sealed minute, in minute order.
    pub minutes: Vec<MinuteEntry>,
    /// Each segment file's map, by file number.
    pub maps: Vec<Arc<Mmap>>,
    /// Clicks excluded by the fraud rules in the sealed minutes.
    pub excluded: u64,
}

/// What the writer and the readers share.
pub struct Shared {
    pub dir: PathBuf,
    pub index: RwLock<Index>,
}

impl Shared {
    /// The index, for reading (a poisoned lock still holds a consistent index: entries are
    /// pushed whole).
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The writer's side: the file minutes are appended to.
pub struct Appender {
    shared: Arc<Shared>,
    /// The file being appended to, its number, how much of it is written, and its size.
    current: Option<(File, u32, u64, u64)>,
}

impl Appender {
    /// An appender of segment files in `dir` (which exists, and is this store's alone).
    pub fn new(dir: &Path) -> Appender {
        let shared = Arc::new(Shared { dir: dir.to_path_buf(), index: RwLock::new(Index::default()) });
        Appender { shared, current: None }
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Writes `bytes`, the records of `minute` (after every minute appended before), and adds
    /// the minute to the index with its section `counts`, `clicks` and `excluded` clicks.
    pub fn append(&mut self, minute: u32, bytes: &[u8], counts: [u32; super::format::SECTIONS], clicks: u64, excluded: u64) -> Result<(), String> {
        let fits = self.current.as_ref().is_some_and(|(_, _, written, size)| written + bytes.len() as u64 <= *size);
        if !fits {
            self.start_file(bytes.len() as u64)?;
        }
        let (file, number, written, _) = self.current.as_mut().expect("a file was just started");
        let path = || self.shared.dir.join(file_name(*number));
        file.write_all_at(bytes, *written).map_err(|e| format!("writing {}: {e}", path().display()))?;
        let entry = MinuteEntry { minute, file: *number, offset: *written, counts, clicks };
        *written += bytes.len() as u64;
        let mut index = self.shared.write();
        index.minutes.push(entry);
        index.excluded += excluded;
        Ok(())
    }

    /// Starts the next segment file, large enough for `at_least` bytes, and maps it.
    fn start_file(&mut self, at_least: u64) -> Result<(), String> {
        let number = self.current.as_ref().map_or(0, |c| c.1 + 1);
        let size = SEGMENT_BYTES.max(at_least).max(1);
        let path = self.shared.dir.join(file_name(number));
        let error = |e: std::io::Error| format!("creating the segment file {}: {e}", path.display());
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(error)?;
        file.set_len(size).map_err(error)?;
        // SAFETY: the file is this store's own, in a directory of its own; it is never cut short,
        // and the only writes to it are to bytes no reader has been pointed at yet.
        let map = unsafe { memmap2::MmapOptions::new().len(size as usize).map(&file) }.map_err(error)?;
        self.shared.write().maps.push(Arc::new(map));
        self.current = Some((file, number, 0, size));
        Ok(())
    }
}

fn file_name(number: u32) -> String {
    format!("segment-{number:06}")
}
