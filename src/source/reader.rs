//! Splits a growing file into lines with bounded memory: a line longer than the limit is skipped
//! up to its newline, keeping only its first bytes for the dead letter.

use std::io::{self, Read};

use super::parse::MAX_LINE_BYTES;

const BUFFER_BYTES: usize = 1 << 20;

/// One line, with the byte offset of its first byte. `bytes` never includes the line end.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    Complete { offset: u64, bytes: &'a [u8] },
    /// Longer than [`MAX_LINE_BYTES`]; `prefix` is its first bytes.
    TooLong { offset: u64, prefix: &'a [u8] },
    /// The file ended without a newline after it (only reported when the file is final).
    Unterminated { offset: u64, bytes: &'a [u8] },
}

pub struct LineReader<R> {
    source: R,
    buffer: Vec<u8>,
    /// `buffer[start..end]` holds bytes read but not yet returned.
    start: usize,
    end: usize,
    /// File offset of `buffer[start]`: past the bytes of an overlong line skipped so far.
    offset: u64,
    /// While skipping an overlong line: where it began and its first bytes.
    skipping: Option<(u64, Vec<u8>)>,
    long_prefix: Vec<u8>,
    at_eof: bool,
}

impl<R: Read> LineReader<R> {
    /// Reads `source` from file offset `offset` (where the source is positioned).
    pub fn new(source: R, offset: u64) -> Self {
        LineReader {
            source,
            buffer: vec![0; BUFFER_BYTES],
            start: 0,
            end: 0,
            offset,
            skipping: None,
            long_prefix: Vec::new(),
            at_eof: false,
        }
    }

    /// The source being read.
    pub fn get_ref(&self) -> &R {
        &self.source
    }

    /// Where the next line not yet returned starts: just past the last line returned. Always a
    /// line start, also while an overlong line is being skipped (its start, until its newline
    /// comes), so that a checkpoint taken here resumes at a line and never inside one.
    pub fn offset(&self) -> u64 {
        match &self.skipping {
            Some((line_start, _)) => *line_start,
            None => self.offset,
        }
    }

    /// How far into the file the reader has read, buffered bytes included.
    pub fn read_position(&self) -> u64 {
        self.offset + (self.end - self.start) as u64
    }

    /// The next line, or `None` at the end of the data. With `file_is_final`, a last line with no
    /// newline is returned as `Unterminated`; otherwise it waits (a writer may still finish it).
    pub fn next_line(&mut self, file_is_final: bool) -> io::Result<Option<Line<'_>>> {
        loop {
            if let Some(newline) = memchr::memchr(b'\n', &self.buffer[self.start..self.end]) {
                let line_start = self.start;
                let line_offset = self.offset;
                self.start += newline + 1;
                self.offset += newline as u64 + 1;
                if let Some((skip_offset, prefix)) = self.skipping.take() {
                    self.long_prefix = prefix;
                    return Ok(Some(Line::TooLong { offset: skip_offset, prefix: &self.long_prefix }));
                }
                let mut bytes = &self.buffer[line_start..line_start + newline];
                if let [rest @ .., b'\r'] = bytes {
                    bytes = rest;
                }
                if bytes.len() > MAX_LINE_BYTES {
                    return Ok(Some(Line::TooLong { offset: line_offset, prefix: &bytes[..MAX_LINE_BYTES] }));
                }
                return Ok(Some(Line::Complete { offset: line_offset, bytes }));
            }
            // No newline in what is buffered.
            let pending = self.end - self.start;
            if self.skipping.is_some() {
                self.start = self.end;
                self.offset += pending as u64;
            } else if pending > MAX_LINE_BYTES + 1 {
                let prefix = self.buffer[self.start..self.start + MAX_LINE_BYTES].to_vec();
                self.skipping = Some((self.offset, prefix));
                self.start = self.end;
                self.offset += pending as u64;
            }
            if self.at_eof || !self.fill()? {
                self.at_eof = false;
                if !file_is_final {
                    return Ok(None);
                }
                if let Some((skip_offset, prefix)) = self.skipping.take() {
                    self.long_prefix = prefix;
                    return Ok(Some(Line::TooLong { offset: skip_offset, prefix: &self.long_prefix }));
                }
                if self.start == self.end {
                    return Ok(None);
                }
                let (line_start, line_offset) = (self.start, self.offset);
                self.offset += (self.end - self.start) as u64;
                self.start = self.end;
                let bytes = &self.buffer[line_start..self.end];
                if bytes.len() > MAX_LINE_BYTES {
                    return Ok(Some(Line::TooLong { offset: line_offset, prefix: &bytes[..MAX_LINE_BYTES] }));
                }
                return Ok(Some(Line::Unterminated { offset: line_offset, bytes }));
            }
        }
    }

    /// Reads more bytes after the pending ones; false at the end of the file.
    fn fill(&mut self) -> io::Result<bool> {
        if self.start > 0 {
            self.buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        loop {
            match self.source.read(&mut self.buffer[self.end..]) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(data: &[u8], file_is_final: bool) -> Vec<String> {
        let mut reader = LineReader::new(data, 0);
        let mut out = Vec::new();
        while let Some(line) = reader.next_line(file_is_final).unwrap() {
            out.push(match line {
                Line::Complete { offset, bytes } => format!("{offset}:{}", String::from_utf8_lossy(bytes)),
                Line::TooLong { offset, prefix } => format!("{offset}:long:{}", prefix.len()),
                Line::Unterminated { offset, bytes } => format!("{offset}:partial:{}", String::from_utf8_lossy(bytes)),
            });
        }
        out
    }

    #[test]
    fn splits_lf_and_crlf_with_offsets() {
        assert_eq!(lines(b"a\r\nbc\n\nd", true), ["0:a", "3:bc", "6:", "7:partial:d"]);
        assert_eq!(lines(b"a\r\nbc\n\nd", false), ["0:a", "3:bc", "6:"]);
    }

    #[test]
    fn overlong_lines_are_skipped_with_bounded_memory() {
        let mut data = vec![b'x'; 3 * BUFFER_BYTES + 17];
        data.push(b'\n');
        data.extend_from_slice(b"next\n");
        let expected_next = format!("{}:next", data.len() - 5);
        assert_eq!(lines(&data, true), ["0:long:4096".to_string(), expected_next]);
        let just_fits = [vec![b'y'; MAX_LINE_BYTES], b"\r\n".to_vec()].concat();
        assert_eq!(lines(&just_fits, true)[0].len(), 2 + MAX_LINE_BYTES);
        let just_over = [vec![b'y'; MAX_LINE_BYTES + 1], b"\n".to_vec()].concat();
        assert_eq!(lines(&just_over, true), ["0:long:4096"]);
        assert_eq!(lines(&vec![b'z'; 2 * BUFFER_BYTES], true), ["0:long:4096"]);
        assert_eq!(lines(&vec![b'z'; MAX_LINE_BYTES + 1], true), ["0:long:4096"]);
        assert_eq!(lines(&vec![b'z'; MAX_LINE_BYTES], true), [format!("0:partial:{}", "z".repeat(MAX_LINE_BYTES))]);
    }

    /// Follow mode: an overlong line whose newline has not come yet keeps the reader's offset at
    /// its start, however much of it was skipped; it is returned once, when the newline comes.
    #[test]
    fn an_unfinished_overlong_line_keeps_the_offset_at_its_start() {
        let mut data = b"h\nshort\n".to_vec();
        data.extend(vec![b'x'; 3 * BUFFER_BYTES]);
        let written = std::rc::Rc::new(std::cell::Cell::new(data.len()));
        data.extend_from_slice(b"yy\nnext\n");
        /// Reads `data` up to what was written so far.
        struct Growing(Vec<u8>, usize, std::rc::Rc<std::cell::Cell<usize>>);
        impl Read for Growing {
            fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
                let n = out.len().min(self.2.get() - self.1);
                out[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
                self.1 += n;
                Ok(n)
            }
        }
        let mut reader = LineReader::new(Growing(data.clone(), 0, written.clone()), 0);
        assert!(matches!(reader.next_line(false).unwrap(), Some(Line::Complete { offset: 0, .. })));
        assert!(matches!(reader.next_line(false).unwrap(), Some(Line::Complete { offset: 2, .. })));
        assert_eq!(reader.next_line(false).unwrap(), None);
        assert_eq!(reader.offset(), 8, "the committed offset stays at the long line's start");
        assert_eq!(reader.read_position(), written.get() as u64, "while the reader has read all of it");
        written.set(data.len());
        let Some(Line::TooLong { offset: 8, prefix }) = reader.next_line(false).unwrap() else { panic!("the long line") };
        assert_eq!(prefix.len(), MAX_LINE_BYTES);
        let next_at = data.len() as u64 - 5;
        assert_eq!(reader.offset(), next_at);
        assert_eq!(reader.next_line(false).unwrap(), Some(Line::Complete { offset: next_at, bytes: b"next" }));
        assert_eq!(reader.next_line(false).unwrap(), None);
    }
}
