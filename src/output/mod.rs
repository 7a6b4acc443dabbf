//! CSV writing shared by the sink's output directory and the store's export: files created
//! with errors that name them, rows formatted straight into a file's buffer, the changelog's
//! fields, ranked rows, and quoted fields.

pub mod changelog;
pub mod directory;

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

use clickagg_dataflows::{Answer, Minute};

pub use directory::Files;

/// Creates (or empties) the file `path`, buffered for large writes: for the store's export, and
/// the dead letters.
pub(crate) fn create(path: &Path) -> io::Result<BufWriter<File>> {
    create_unbuffered(path).map(|f| BufWriter::with_capacity(1 << 20, f))
}

/// Creates (or empties) the file `path`, with an error that names it. The output directory's
/// files are created once [`set_aside_previous`] has moved a previous run's out of the way.
pub(crate) fn create_unbuffered(path: &Path) -> io::Result<File> {
    File::create(path).map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display())))
}

/// An output file whose lines are formatted straight into its buffer.
///
/// Through a `BufWriter`, each line is built in a buffer of its own and then copied in: for the
/// 15M short lines of a 10M-click replay, that second copy was a tenth of the sink's time.
pub struct LineFile {
    file: File,
    buffer: Vec<u8>,
}

impl LineFile {
    /// Written to the file once the buffer holds this much.
    const WRITE_AT: usize = 1 << 20;

    pub fn create(path: &Path) -> io::Result<LineFile> {
        let file = create_unbuffered(path)?;
        // Room for the longest line past `WRITE_AT`, so that the buffer never grows.
        Ok(LineFile { file, buffer: Vec::with_capacity(Self::WRITE_AT + 4096) })
    }

    /// The buffer, to append one whole line to; then [`LineFile::end_line`].
    pub fn line(&mut self) -> &mut Vec<u8> {
        &mut self.buffer
    }

    pub fn end_line(&mut self) -> io::Result<()> {
        if self.buffer.len() >= Self::WRITE_AT {
            self.write_buffer()?;
        }
        Ok(())
    }

    fn write_buffer(&mut self) -> io::Result<()> {
        self.file.write_all(&self.buffer)?;
        self.buffer.clear();
        Ok(())
    }
}

impl Write for LineFile {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        self.end_line()?;
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_buffer()?;
        self.file.flush()
    }
}

impl Drop for LineFile {
    /// As a `BufWriter` does: what is buffered is written, and an error here goes unreported
    /// (a run that ends normally has flushed every file, and reported any error then).
    fn drop(&mut self) {
        let _ = self.write_buffer();
    }
}

/// The changelog's `view` of an answer: its view's name, and a window's its length too.
pub fn changelog_view(answer: &Answer) -> std::borrow::Cow<'static, str> {
    match answer {
        Answer::TopWindow { window, .. } => std::borrow::Cow::Owned(format!("top_window_{window}m")),
        _ => std::borrow::Cow::Borrowed(answer.view().name()),
    }
}

/// The changelog's `view` and `value` of an answer, its key columns joined by `/` in `key`.
pub fn changelog_fields(answer: &Answer, key: &mut String) -> (std::borrow::Cow<'static, str>, u64) {
    use std::fmt::Write as _;
    key.clear();
    let view = changelog_view(answer);
    if let Some(minute) = answer.minute() {
        let _ = write!(key, "{minute}/");
    }
    let (country, id, value) = answer.key_and_clicks();
    if let Some(country) = country {
        let _ = write!(key, "{country}/");
    }
    let _ = write!(key, "{id}");
    (view, value)
}

/// Ranks `(ad, clicks)` by clicks descending, then ad ascending (SPEC §3), and writes
/// `{at},{rank},{ad},{clicks}` rows.
pub fn write_ranked(out: &mut impl Write, at: Minute, ranked: &mut [(u64, u64)]) -> io::Result<()> {
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    for (rank, (ad, clicks)) in ranked.iter().enumerate() {
        writeln!(out, "{at},{},{ad},{clicks}", rank + 1)?;
    }
    Ok(())
}

/// A CSV field in double quotes, any invalid UTF-8 replaced so the file stays text.
pub fn write_quoted(out: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    let text = String::from_utf8_lossy(bytes);
    out.write_all(b"\"")?;
    out.write_all(text.replace('"', "\"\"").as_bytes())?;
    out.write_all(b"\"")
}
