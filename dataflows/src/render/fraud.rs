//! Fraud rules: which clicks are not billable. Both sides are kept: the billable clicks feed every
//! answer of SPEC §4, the excluded ones their own per-minute count.

use std::hash::Hash;

use differential_dataflow::operators::ThresholdTotal;
use differential_dataflow::{ExchangeData, VecCollection};

use crate::plan::FraudRules;
use crate::render::counts::count_named;
use crate::render::traces::register_trace;
use crate::types::{minute_of, ClickAttrs, ClickKey, Ip, Minute, Time};

type Clicks<'scope> = VecCollection<'scope, Time, (ClickKey, ClickAttrs)>;

/// The clicks and their split by the rules.
pub struct Billing<'scope> {
    pub billable: Clicks<'scope>,
    pub excluded: Clicks<'scope>,
}

/// Splits distinct clicks into billable and excluded: a click is excluded when its ip or its
/// user_id has more than `max_clicks_per_minute` clicks in its minute, or its ip is blocklisted.
///
/// The rule is exact and retroactive: when the group's click over the limit arrives, every click
/// of the group leaves the billable side at that time, so every answer built on it is retracted
/// and restated.
pub fn split_billable<'scope>(clicks: Clicks<'scope>, rules: &FraudRules) -> Billing<'scope> {
    let mut exclusions = Vec::new();
    if let Some(limit) = rules.max_clicks_per_minute {
        exclusions.push(over_limit("Ip", clicks.clone(), limit, |key, attrs| (minute_of(key.ts), attrs.ip)));
        exclusions.push(over_limit("User", clicks.clone(), limit, |key, attrs| (minute_of(key.ts), attrs.user)));
    }
    if !rules.blocklist.is_empty() {
        let blocklist = rules.blocklist.clone();
        exclusions.push(clicks.clone().filter(move |(_, attrs)| blocklist.iter().any(|net| net.contains(attrs.ip))));
    }
    let scope = clicks.scope();
    // A click broken by several rules is excluded once.
    let excluded = differential_dataflow::collection::concatenate(scope, exclusions).arrange_by_self_named("Arrange: ExcludedClicks");
    register_trace("Arrange: ExcludedClicks", &excluded.trace);
    let excluded = excluded.distinct_total();
    let billable = clicks.concat(excluded.clone().negate());
    Billing { billable, excluded }
}

/// The clicks of every `(minute, group)` that has more than `limit` clicks.
fn over_limit<'scope, G>(
    name: &str,
    clicks: Clicks<'scope>,
    limit: u64,
    group_of: impl Fn(&ClickKey, &ClickAttrs) -> (Minute, G) + Clone + 'static,
) -> Clicks<'scope>
where
    G: ExchangeData + Hash + serde::Serialize,
{
    let group = group_of.clone();
    let counts = count_named(&format!("{name}Minute"), clicks.clone().map(move |(key, attrs)| group(&key, &attrs)));
    let flagged = counts
        .filter(move |(_, clicks)| *clicks > limit)
        .map(|(group, _)| group)
        .arrange_by_self_named(&format!("Arrange: {name}MinuteOverLimit"));
    register_trace(&format!("Arrange: {name}MinuteOverLimit"), &flagged.trace);
    let by_group = clicks
        .map(move |(key, attrs)| (group_of(&key, &attrs), (key, attrs)))
        .arrange_by_key_named(&format!("Arrange: ClicksBy{name}Minute"));
    register_trace(&format!("Arrange: ClicksBy{name}Minute"), &by_group.trace);
    by_group.join_core(flagged, |_group, click, ()| Some(*click))
}

/// An IPv4 or IPv6 network, in the IPv6 space that [`Ip`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    pub network: Ip,
    /// Leading bits that must match, 0..=128 (an IPv4 /n is n + 96).
    pub prefix: u8,
}

impl IpNet {
    /// Parses `1.2.3.4`, `10.0.0.0/8`, `2001:db8::/32`.
    pub fn parse(text: &str) -> Result<IpNet, String> {
        let text = text.trim();
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let address: std::net::IpAddr =
            address.parse().map_err(|_| format!("'{text}' is not an IP address or CIDR network"))?;
        let (offset, max) = if address.is_ipv4() { (96, 32) } else { (0, 128) };
        let bits = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(bits) if bits <= max => bits,
                _ => return Err(format!("'{text}': the prefix length must be 0 to {max}")),
            },
        };
        let prefix = offset + bits;
        let network = Ip::new(Ip::from_std(address).bits() & mask(prefix));
        Ok(IpNet { network, prefix })
    }

    pub fn contains(&self, ip: Ip) -> bool {
        ip.bits() & mask(self.prefix) == self.network.bits()
    }
}

fn mask(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> Ip {
        Ip::from_std(text.parse().unwrap())
    }

    #[test]
    fn networks() {
        let net = IpNet::parse("10.1.0.0/16").unwrap();
        assert!(net.contains(ip("10.1.200.3")) && net.contains(ip("::ffff:10.1.0.1")));
        assert!(!net.contains(ip("10.2.0.1")) && !net.contains(ip("2001:db8::1")));
        assert!(IpNet::parse("203.0.113.7").unwrap().contains(ip("203.0.113.7")));
        assert!(!IpNet::parse("203.0.113.7").unwrap().contains(ip("203.0.113.8")));
        assert!(IpNet::parse("2001:db8::/32").unwrap().contains(ip("2001:db8:ffff::1")));
        assert!(IpNet::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "10.0.0/8", "::/129", "nonsense", "10.0.0.0/x"] {
            assert!(IpNet::parse(bad).is_err(), "{bad}");
        }
    }
}
