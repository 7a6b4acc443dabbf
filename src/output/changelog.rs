//! Changelog lines (`time,view,key,value,diff`) and the tail of view rows, formatted with itoa
//! straight into a [`LineFile`]'s buffer.

use std::io;

use clickagg_dataflows::{Answer, Time, View};

use super::{changelog_view, LineFile};

/// The start of a changelog line, `{time},{view},{minute}/` (`{time},top_window_{M}m,` for a
/// window), kept while consecutive lines share it: a time's answers come sorted, so in runs of
/// one view and minute.
#[derive(Default)]
pub struct LinePrefix {
    bytes: Vec<u8>,
    /// The length of `{time},`.
    stamp: usize,
    /// The view and the minute (the window's length, for a window) that `bytes` ends with.
    of: Option<(View, u32)>,
}

impl LinePrefix {
    /// Starts the lines of `time`.
    pub fn start(&mut self, time: Time) {
        self.bytes.clear();
        self.bytes.extend_from_slice(itoa::Buffer::new().format(time).as_bytes());
        self.bytes.push(b',');
        self.stamp = self.bytes.len();
        self.of = None;
    }

    /// The start of `answer`'s line.
    fn of(&mut self, answer: &Answer) -> &[u8] {
        let of = match *answer {
            Answer::TopWindow { window, .. } => (View::TopWindow, window),
            _ => (answer.view(), answer.minute().expect("only window answers have no minute")),
        };
        if self.of != Some(of) {
            self.of = Some(of);
            self.bytes.truncate(self.stamp);
            self.bytes.extend_from_slice(changelog_view(answer).as_bytes());
            self.bytes.push(b',');
            if let Some(minute) = answer.minute() {
                self.bytes.extend_from_slice(itoa::Buffer::new().format(minute).as_bytes());
                self.bytes.push(b'/');
            }
        }
        &self.bytes
    }
}

/// Appends one changelog line: `time,view,key,value,diff`, key columns joined by `/`.
pub fn write_change(out: &mut LineFile, prefix: &mut LinePrefix, answer: &Answer, diff: isize) -> io::Result<()> {
    let mut num = itoa::Buffer::new();
    let line = out.line();
    line.extend_from_slice(prefix.of(answer));
    push_key_and_clicks(line, &mut num, answer, b'/');
    line.push(b',');
    line.extend_from_slice(num.format(diff).as_bytes());
    line.push(b'\n');
    out.end_line()
}

/// Appends an answer's key below its minute and its clicks, `{country}{separator}{id},{clicks}`
/// (the country for the per-country view only): the tail of a view's row and of a changelog line.
pub fn push_key_and_clicks(line: &mut Vec<u8>, num: &mut itoa::Buffer, answer: &Answer, separator: u8) {
    let (country, id, clicks) = answer.key_and_clicks();
    if let Some(country) = country {
        line.extend_from_slice(&country.as_bytes());
        line.push(separator);
    }
    line.extend_from_slice(num.format(id).as_bytes());
    line.push(b',');
    line.extend_from_slice(num.format(clicks).as_bytes());
}
