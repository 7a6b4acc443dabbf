//! The records that flow through the dataflow. All are small, `Copy`, and ordered so that the
//! derived `Ord` is the order the SPEC asks for (tie-breaks, output sort order).

use serde::{Deserialize, Serialize};

/// Logical time: milliseconds since the Unix epoch, rounded down to the plan's tick.
pub type Time = u64;
/// `floor(ts / 60000)`: the tumbling one-minute window a click belongs to.
pub type Minute = u32;

pub const MINUTE_MS: u64 = 60_000;

/// The minute of an event time.
pub fn minute_of(ts_ms: u64) -> Minute {
    (ts_ms / MINUTE_MS) as Minute
}

/// A 128-bit integer kept as two words, the high one first: ordered as the integer is, but
/// aligned to 8 bytes where a `u128` aligns to 16. With `u128`s, a click's key (the hash and the
/// ts) took 32 bytes for 24, and its update 96 for 88; every click crosses the exchange and
/// leaves de-duplication as one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Bits128 {
    high: u64,
    low: u64,
}

impl Bits128 {
    pub const fn new(bits: u128) -> Bits128 {
        Bits128 { high: (bits >> 64) as u64, low: bits as u64 }
    }

    pub const fn get(self) -> u128 {
        (self.high as u128) << 64 | self.low as u128
    }

    /// The low 64 bits.
    pub const fn low(self) -> u64 {
        self.low
    }
}

/// An IP address as one integer: IPv6 as is, IPv4 (and IPv4-mapped IPv6) in `::ffff:0:0/96`.
/// Numeric order is the order used to break ties between disagreeing copies of a click.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Ip(Bits128);

impl Ip {
    pub const fn new(bits: u128) -> Ip {
        Ip(Bits128::new(bits))
    }

    /// The address as one integer (see [`Ip`]).
    pub const fn bits(self) -> u128 {
        self.0.get()
    }

    pub fn from_std(ip: std::net::IpAddr) -> Ip {
        match ip {
            std::net::IpAddr::V4(v4) => Ip::new(v4.to_ipv6_mapped().to_bits()),
            std::net::IpAddr::V6(v6) => Ip::new(v6.to_bits()),
        }
    }
    pub fn to_std(self) -> std::net::IpAddr {
        std::net::Ipv6Addr::from_bits(self.bits()).to_canonical()
    }
}

impl std::fmt::Display for Ip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.to_std().fmt(f)
    }
}

/// ISO 3166 alpha-2 code, upper case, packed big-endian so that numeric order is text order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Country(pub u16);

impl Country {
    /// Accepts exactly two ASCII letters, either case.
    pub fn parse(bytes: &[u8]) -> Option<Country> {
        match bytes {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => Some(Country(
                u16::from_be_bytes([a.to_ascii_uppercase(), b.to_ascii_uppercase()]),
            )),
            _ => None,
        }
    }
    pub fn as_bytes(self) -> [u8; 2] {
        self.0.to_be_bytes()
    }
}

impl std::fmt::Display for Country {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b] = self.as_bytes();
        write!(f, "{}{}", a as char, b as char)
    }
}

/// What identifies one click: retries resend the same `(event_id, ts)`.
/// `event` is the 128-bit XXH3 of the event_id bytes (a collision needs ~2^64 distinct ids).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClickKey {
    pub event: Bits128,
    pub ts: u64,
}

/// Everything else about a click. Field order is the SPEC's tie-break order, so when copies of
/// one click disagree, the derived `Ord` minimum is the copy that counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClickAttrs {
    pub ad: u64,
    pub campaign: u64,
    pub user: u64,
    pub ip: Ip,
    pub country: Country,
}

/// One delivery of a click, as read from a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Click {
    pub key: ClickKey,
    pub attrs: ClickAttrs,
}

impl Click {
    pub fn minute(&self) -> Minute {
        minute_of(self.key.ts)
    }
}

/// Why a line is not a click. The names are the `reason` column of `dead_letter.csv`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Reason {
    /// The partition's header line is not a usable header; every line of it lands here.
    BadHeader,
    /// Over 4 KiB; only its first 4 KiB are kept in the dead letter.
    LineTooLong,
    InvalidUtf8,
    EmptyLine,
    /// Fewer fields than the header names.
    MissingField,
    /// More fields than the header names.
    ExtraField,
    BadEventId,
    BadTs,
    BadAdId,
    BadCampaignId,
    BadUserId,
    BadIp,
    BadCountry,
    /// Older than allowed lateness (SPEC §2): a valid click that `run` does not count.
    TooLate,
    /// The file ended without a newline after this line; in replay it is never completed.
    UnterminatedLine,
    /// Follow mode: a valid row of a partition that was idle (or appeared late) while the
    /// watermark moved on without it, for a minute already final. `run` does not count it.
    BehindWatermark,
    /// Follow mode: the file was truncated, replaced or deleted under the reader; the line
    /// says which. The partition is not read further.
    PartitionRotated,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::BadHeader => "bad_header",
            Reason::LineTooLong => "line_too_long",
            Reason::InvalidUtf8 => "invalid_utf8",
            Reason::EmptyLine => "empty_line",
            Reason::MissingField => "missing_field",
            Reason::ExtraField => "extra_field",
            Reason::BadEventId => "bad_event_id",
            Reason::BadTs => "bad_ts",
            Reason::BadAdId => "bad_ad_id",
            Reason::BadCampaignId => "bad_campaign_id",
            Reason::BadUserId => "bad_user_id",
            Reason::BadIp => "bad_ip",
            Reason::BadCountry => "bad_country",
            Reason::TooLate => "too_late",
            Reason::UnterminatedLine => "unterminated_line",
            Reason::BehindWatermark => "behind_watermark",
            Reason::PartitionRotated => "partition_rotated",
        }
    }
}

/// A line that is not a click, with where it was and why. These flow in their own collection
/// beside the clicks (an error collection), to the same sink.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeadLetter {
    pub partition: u32,
    pub offset: u64,
    pub reason: Reason,
    /// The line's bytes (at most 4 KiB of them), without its line end.
    pub line: Vec<u8>,
}

/// How far a source has read one partition, and what it made of it (cumulative counters).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PartitionProgress {
    pub partition: u32,
    /// Byte offset just past the last line read.
    pub offset: u64,
    pub max_ts: Option<u64>,
    /// Lines read after the header.
    pub lines: u64,
    /// Clicks accepted (duplicates included), of which `late` were behind the watermark.
    pub accepted: u64,
    pub late: u64,
    pub too_late: u64,
    /// Lines that are not clicks (every dead-letter reason but `too_late`).
    pub malformed: u64,
    pub finished: bool,
    /// xxh3 of the partition's first `min(offset, 4096)` bytes, taken by the reader (the one
    /// process sure to have the file): the store keeps it to recognize a replaced file.
    pub head_hash: u64,
}

/// What the sources tell the sink besides clicks.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SourceNote {
    Dead(DeadLetter),
    Progress(PartitionProgress),
    /// A partition found after the start (follow mode): its id and its name, sent by the worker
    /// that reads it before any other note of it. The sink names it by this, as the process
    /// that holds the sink need not see the file.
    Found { partition: u32, name: String },
}

#[cfg(test)]
mod tests {
    use super::{Bits128, Ip};

    /// Two words order as the integer does, and give it back: the tie-break between disagreeing
    /// copies of a click compares IPs, and its answer must not change with the layout.
    #[test]
    fn bits128_orders_as_the_integer_and_round_trips() {
        let mut values = vec![0, 1, u64::MAX as u128, 1 << 64, (1 << 64) + 1, u128::MAX - 1, u128::MAX];
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..64 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let high = state.rotate_left(17) as u128;
            values.extend([high << 64 | state as u128, state as u128, high << 64]);
        }
        for &a in &values {
            assert_eq!(Bits128::new(a).get(), a);
            assert_eq!(Bits128::new(a).low(), a as u64);
            assert_eq!(Ip::new(a).bits(), a);
            for &b in &values {
                assert_eq!(Bits128::new(a).cmp(&Bits128::new(b)), a.cmp(&b), "{a:#x} against {b:#x}");
                assert_eq!(Ip::new(a).cmp(&Ip::new(b)), a.cmp(&b), "{a:#x} against {b:#x}");
            }
        }
        assert_eq!(size_of::<super::Click>(), 72, "a click has no padding beyond its country's");
    }
}
