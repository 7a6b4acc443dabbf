//! The query string of a request: parameters, filters, minutes, windows and ranges, with the
//! limits that keep a request cheap. Every refusal is a [`Failure`] that names the problem.

use std::collections::BTreeMap;

use clickagg_dataflows::render::filters::{FilterKey, FilterRow};
use clickagg_dataflows::{Country, Ip, Minute, MINUTE_MS};
use serde_json::{json, Value};

use crate::source::parse::parse_ip;

/// Longest accepted request target (path and query string), in bytes.
pub const MAX_URL_BYTES: usize = 4096;
/// Largest `count` of `popular_ads` (SPEC §3: k up to 1000).
pub const MAX_COUNT: usize = 1000;
/// Longest window or range a query may span, in minutes (a week).
pub const MAX_SPAN_MINUTES: u64 = 7 * 24 * 60;

/// An error answer: status and message.
pub struct Failure(pub u16, pub String);

pub fn bad(message: impl Into<String>) -> Failure {
    Failure(400, message.into())
}

/// A query string's parameters; each may appear once.
#[derive(Debug)]
pub struct Params(BTreeMap<String, String>);

/// Parses `a=1&b=2`, percent-decoding names and values. Repeated names are an error: a client
/// that sends `country=US&country=FR` means something we would otherwise guess at.
pub fn parse_query(query: &str) -> Result<Params, String> {
    let mut params = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let (name, value) = (percent_decode(name)?, percent_decode(value)?);
        if params.insert(name.clone(), value).is_some() {
            return Err(format!("parameter {name} is given more than once"));
        }
    }
    Ok(Params(params))
}

/// Decodes a query-string name or value: `+` is a space and `%XX` a byte (with the
/// `percent-encoding` crate), and the result must be UTF-8. A `%` not followed by two hex digits
/// is an error rather than a literal `%`: such a client sent something it did not mean.
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let escapes_are_whole = bytes
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'%')
        .all(|(at, _)| bytes.get(at + 1..at + 3).is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)));
    if !escapes_are_whole {
        return Err(format!("bad percent-escape in {text:?}"));
    }
    let spaced = text.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|decoded| decoded.into_owned())
        .map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

impl Params {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|s| s.as_str()).filter(|s| !s.is_empty())
    }

    /// Refuses parameters outside `allowed`, so that a typo is an error, not a silent default.
    pub fn only(&self, allowed: &[&str]) -> Result<(), Failure> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(unknown) => Err(bad(format!("unknown parameter {unknown}; this endpoint takes: {}", allowed.join(", ")))),
            None => Ok(()),
        }
    }

    pub fn filter(&self) -> Result<Filter, Failure> {
        let country = match self.get("country") {
            Some(text) => Some(Country::parse(text.as_bytes()).ok_or_else(|| bad(format!("country must be two ASCII letters, not {text:?}")))?),
            None => None,
        };
        let ip = match self.get("ip") {
            Some(text) => Some(parse_ip(text.as_bytes()).ok_or_else(|| bad(format!("ip must be an IPv4 or IPv6 address, not {text:?}")))?),
            None => None,
        };
        let user = self.get("user_id").map(|text| parse_id(text, "user_id")).transpose()?;
        Ok(Filter { country, ip, user })
    }
}

pub struct Filter {
    pub country: Option<Country>,
    pub ip: Option<Ip>,
    pub user: Option<u64>,
}

impl Filter {
    pub fn json(&self) -> Value {
        json!({
            "country": self.country.map(|c| c.to_string()),
            "ip": self.ip.map(|ip| ip.to_string()),
            "user_id": self.user,
        })
    }

    /// The key to peek at, when the filter has a high-cardinality column.
    pub fn peek_key(&self) -> Option<FilterKey> {
        match (self.ip, self.user) {
            (Some(ip), _) => Some(FilterKey::Ip(ip)),
            (None, Some(user)) => Some(FilterKey::User(user)),
            (None, None) => None,
        }
    }

    pub fn admits(&self, row: &FilterRow) -> bool {
        self.country.is_none_or(|c| row.country == c)
            && self.ip.is_none_or(|ip| row.ip == ip)
            && self.user.is_none_or(|user| row.user == user)
    }
}

pub fn parse_id(text: &str, what: &str) -> Result<u64, Failure> {
    text.parse().map_err(|_| bad(format!("{what} must be an unsigned integer, not {text:?}")))
}

/// A minute given as a minute number (`floor(ts / 60000)`) or an RFC 3339 time.
pub fn parse_minute(text: &str) -> Result<Minute, String> {
    if let Ok(minute) = text.parse::<Minute>() {
        return Ok(minute);
    }
    let ms = parse_rfc3339_ms(text).ok_or_else(|| format!("{text:?} is neither a minute number nor an RFC 3339 time"))?;
    Minute::try_from(ms.div_euclid(MINUTE_MS as i64)).map_err(|_| format!("{text:?} is out of range"))
}

/// An RFC 3339 time, `YYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)`, to ms since the epoch (fractions
/// below the millisecond dropped), parsed by `jiff`. A time without its offset is refused: it
/// would name a different minute in every time zone.
fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let time: jiff::Timestamp = text.parse().ok()?;
    Some(time.as_millisecond())
}

pub fn parse_window(window: &str) -> Result<Minute, Failure> {
    let minutes = crate::config::parse_windows(window)
        .ok()
        .filter(|w| w.len() == 1)
        .map(|w| w[0])
        .ok_or_else(|| bad(format!("window must be a whole number of minutes like 5m or 1h, not {window:?}")))?;
    if u64::from(minutes) > MAX_SPAN_MINUTES {
        return Err(bad(format!("window is {minutes} minutes; at most {MAX_SPAN_MINUTES}")));
    }
    Ok(minutes)
}

/// What a top-K is over: one minute, or the last M minutes (the default, 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopSpan {
    Minute(Minute),
    Window(Minute),
}

impl TopSpan {
    /// `minute=` or `window=` (not both).
    pub fn parse(params: &Params) -> Result<TopSpan, Failure> {
        match (params.get("minute"), params.get("window")) {
            (Some(_), Some(_)) => Err(bad("give minute or window, not both")),
            (Some(minute), None) => Ok(TopSpan::Minute(parse_minute(minute).map_err(bad)?)),
            (None, window) => Ok(TopSpan::Window(parse_window(window.unwrap_or("5m"))?)),
        }
    }

    /// The minutes `[from, to)` it covers when answers stand at boundary `w`.
    pub fn range(self, w: Minute) -> (Minute, Minute) {
        match self {
            TopSpan::Minute(minute) => (minute, minute + 1),
            TopSpan::Window(minutes) => (w.saturating_sub(minutes), w),
        }
    }
}

/// `[from, to)` of a count: `window=M` (the last M minutes), or given, or around the boundary
/// `w` (default the last minute).
pub fn count_range(params: &Params, w: Minute) -> Result<(Minute, Minute), Failure> {
    if let Some(window) = params.get("window") {
        if params.get("from").is_some() || params.get("to").is_some() {
            return Err(bad("give window or from/to, not both"));
        }
        let minutes = parse_window(window)?;
        return Ok((w.saturating_sub(minutes), w));
    }
    let from = params.get("from").map(parse_minute).transpose().map_err(bad)?;
    let to = params.get("to").map(parse_minute).transpose().map_err(bad)?;
    let (from, to) = match (from, to) {
        (None, None) => (w.saturating_sub(1), w),
        (Some(from), None) => (from, w.max(from)),
        (None, Some(to)) => (to.saturating_sub(1), to),
        (Some(from), Some(to)) => (from, to),
    };
    if to < from {
        return Err(bad(format!("to ({to}) is before from ({from})")));
    }
    if u64::from(to - from) > MAX_SPAN_MINUTES {
        return Err(bad(format!("the range spans {} minutes; at most {MAX_SPAN_MINUTES}", to - from)));
    }
    Ok((from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode_and_refuse_repeats() {
        let p = parse_query("count=10&country=U%53&x=a+b").unwrap();
        assert_eq!((p.get("count"), p.get("country"), p.get("x")), (Some("10"), Some("US"), Some("a b")));
        assert!(parse_query("a=1&a=2").unwrap_err().contains("more than once"));
        assert!(parse_query("a=%zz").is_err());
        assert!(parse_query("a=%ff").is_err());
        assert!(parse_query("a=%4").is_err());
        assert!(parse_query("a=50%").is_err());
        let p = parse_query("q=%2B1%20%C3%A9&%6Eame=a%2Cb").unwrap();
        assert_eq!((p.get("q"), p.get("name")), (Some("+1 \u{e9}"), Some("a,b")));
    }

    #[test]
    fn minutes_as_numbers_or_rfc3339() {
        assert_eq!(parse_minute("29000000"), Ok(29_000_000));
        assert_eq!(parse_minute("1970-01-01T00:01:00Z"), Ok(1));
        assert_eq!(parse_minute("1970-01-01T00:01:59.999Z"), Ok(1));
        assert_eq!(parse_minute("2026-11-22T10:00:00Z"), Ok((1_795_341_600_000u64 / 60_000) as u32));
        assert_eq!(parse_minute("2026-11-22T11:00:00+01:00"), parse_minute("2026-11-22T10:00:00Z"));
        assert_eq!(parse_minute("2026-11-22T09:30:00-00:30"), parse_minute("2026-11-22T10:00:00Z"));
        assert_eq!(parse_minute("1970-01-01t00:02:00.123456789z"), Ok(2));
        for bad in ["", "yesterday", "2026-13-01T00:00:00Z", "2026-11-22T10:00:00", "-5", "2026-11-22T10:00:00.Z", "1970-01-01T15:00:00.5+0\u{3fc}0+", "1969-12-31T23:59:00Z", "2026-02-30T00:00:00Z", "2026-11-22T10:00:00Z\u{e9}"] {
            assert!(parse_minute(bad).is_err(), "{bad:?}");
        }
    }
}
