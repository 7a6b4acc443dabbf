//! The plan: plain configuration data that says what the dataflow maintains. Rendering reads it;
//! nothing here knows about timely.

use crate::types::Ip;

/// What to maintain and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// How many ads each top-K keeps (SPEC: 100).
    pub top_k: usize,
    /// Hierarchical top-K ([`crate::render::topk::top_k`], which ranks the per-country minutes
    /// kept for serving): the number of hash buckets of ad_id at each level
    /// before the final group, finest first. Each level keeps the top K of each bucket, so one click
    /// re-sorts a bucket of about `ads_per_minute / buckets[0]` entries, then groups of
    /// `K * buckets[i] / buckets[i+1]`, instead of every ad of the minute.
    pub top_k_buckets: Vec<u32>,
    /// The sliding windows, in minutes: for each M, the top K of the last M minutes.
    pub windows: Vec<u32>,
    /// Which clicks are not billable; with no rules, every click is.
    pub fraud: FraudRules,
}

/// Fraud rules (off by default, so that every answer is exactly SPEC's).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FraudRules {
    /// A click is not billable when its ip or its user_id has more clicks than this in its minute.
    pub max_clicks_per_minute: Option<u64>,
    /// A click from an address in one of these networks is not billable.
    pub blocklist: Vec<IpNet>,
}

impl FraudRules {
    pub fn is_active(&self) -> bool {
        self.max_clicks_per_minute.is_some() || !self.blocklist.is_empty()
    }
}

impl Default for Plan {
    fn default() -> Self {
        Plan { top_k: 100, top_k_buckets: vec![256, 16], windows: vec![1, 5, 60], fraud: FraudRules::default() }
    }
}

impl Plan {
    /// Checks the invariants rendering relies on.
    pub fn validate(&self) -> Result<(), String> {
        if self.top_k == 0 || self.top_k > 1000 {
            return Err(format!("top-K must be between 1 and 1000, not {}", self.top_k));
        }
        let mut windows = self.windows.clone();
        windows.sort();
        windows.dedup();
        if windows.len() != self.windows.len() || windows.first() == Some(&0) {
            return Err(format!("windows must be distinct and at least one minute: {:?}", self.windows));
        }
        let mut previous = u32::MAX;
        for &buckets in &self.top_k_buckets {
            if !buckets.is_power_of_two() || buckets < 2 || buckets >= previous {
                return Err(format!(
                    "top-K bucket levels must be decreasing powers of two, at least 2: {:?}",
                    self.top_k_buckets
                ));
            }
            previous = buckets;
        }
        Ok(())
    }
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
