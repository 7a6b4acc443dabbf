//! The settings that change answers, as data: a store records them (as JSON) and is resumed,
//! mirrored and reconciled only under the same; processes of a cluster compare them. Where two
//! differ, [`AnswerSettings::differences`] says how in the words of the command line
//! (`allowed lateness: 5m in the store, 10m now`).

use serde::{Deserialize, Serialize};

use clickagg_dataflows::{EventTimeRules, Plan};

/// The settings a store's answers were computed with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnswerSettings {
    /// `--watermark-delay`.
    pub watermark_delay_ms: u64,
    /// `--allowed-lateness`; `None`: no lateness bound (reconciliation).
    pub allowed_lateness_ms: Option<u64>,
    /// `--tick`.
    pub tick_ms: u64,
    /// `--top-k`.
    pub top_k: usize,
    /// The fan-in of the top-K stages (not a flag; fixed by the build).
    pub top_k_buckets: Vec<u32>,
    /// `--windows`, in minutes.
    pub windows: Vec<u32>,
    /// `--max-clicks-per-minute`.
    pub max_clicks_per_minute: Option<u64>,
    /// `--blocklist`, by its size and a fingerprint of its networks.
    pub blocklist: Blocklist,
}

/// A blocklist as a store records it: how many networks, and a fingerprint of them (the list
/// itself stays in the user's file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocklist {
    pub networks: usize,
    /// 16 hex digits.
    pub fingerprint: String,
}

/// One setting, for saying which differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Setting {
    WatermarkDelay,
    AllowedLateness,
    Tick,
    TopK,
    TopKBuckets,
    Windows,
    MaxClicksPerMinute,
    Blocklist,
}

impl Setting {
    pub const ALL: [Setting; 8] = [
        Setting::WatermarkDelay,
        Setting::AllowedLateness,
        Setting::Tick,
        Setting::TopK,
        Setting::TopKBuckets,
        Setting::Windows,
        Setting::MaxClicksPerMinute,
        Setting::Blocklist,
    ];

    /// The setting's name as a person says it.
    pub fn name(self) -> &'static str {
        match self {
            Setting::WatermarkDelay => "watermark delay",
            Setting::AllowedLateness => "allowed lateness",
            Setting::Tick => "tick",
            Setting::TopK => "top k",
            Setting::TopKBuckets => "top-K buckets",
            Setting::Windows => "windows",
            Setting::MaxClicksPerMinute => "max clicks per minute",
            Setting::Blocklist => "blocklist",
        }
    }
}

impl Blocklist {
    /// The fingerprint of `networks` (their debug form, hashed: the same as stores written
    /// before the settings were typed recorded).
    pub fn of(networks: &[clickagg_dataflows::IpNet]) -> Blocklist {
        let text = format!("{networks:?}");
        Blocklist { networks: networks.len(), fingerprint: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes())) }
    }
}

impl AnswerSettings {
    /// The settings of a run with these rules and plan.
    pub fn of(rules: &EventTimeRules, plan: &Plan) -> AnswerSettings {
        AnswerSettings {
            watermark_delay_ms: rules.watermark_delay_ms,
            allowed_lateness_ms: rules.allowed_lateness_ms,
            tick_ms: rules.tick_ms,
            top_k: plan.top_k,
            top_k_buckets: plan.top_k_buckets.clone(),
            windows: plan.windows.clone(),
            max_clicks_per_minute: plan.fraud.max_clicks_per_minute,
            blocklist: Blocklist::of(&plan.fraud.blocklist),
        }
    }

    /// As a store records them: compact JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("settings are plain data")
    }

    /// Reads recorded settings: JSON, or the `key=value …` text that stores written before the
    /// settings were typed hold (read field by field, so such a store is resumed, exported and
    /// reconciled as before).
    pub fn parse(text: &str) -> Result<AnswerSettings, String> {
        if text.trim_start().starts_with('{') {
            return serde_json::from_str(text).map_err(|e| format!("settings {text:?} cannot be read: {e}"));
        }
        parse_legacy(text)
    }

    /// One setting's value as a person writes it: `5m`, `1m,5m,60m`, `none`.
    pub fn describe(&self, setting: Setting) -> String {
        let list = |v: &[u32], unit: &str| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.iter().map(|x| format!("{x}{unit}")).collect::<Vec<_>>().join(",")
            }
        };
        match setting {
            Setting::WatermarkDelay => duration(self.watermark_delay_ms),
            Setting::AllowedLateness => self.allowed_lateness_ms.map_or("none (no lateness bound)".into(), duration),
            Setting::Tick => duration(self.tick_ms),
            Setting::TopK => self.top_k.to_string(),
            Setting::TopKBuckets => list(&self.top_k_buckets, ""),
            Setting::Windows => list(&self.windows, "m"),
            Setting::MaxClicksPerMinute => self.max_clicks_per_minute.map_or("none".into(), |n| n.to_string()),
            Setting::Blocklist => match self.blocklist.networks {
                0 => "none".into(),
                n => format!("{n} networks (fingerprint {})", self.blocklist.fingerprint),
            },
        }
    }

    /// The settings that differ between `self` and `other`.
    pub fn differing(&self, other: &AnswerSettings) -> Vec<Setting> {
        Setting::ALL.into_iter().filter(|&s| !self.same(other, s)).collect()
    }

    fn same(&self, other: &AnswerSettings, setting: Setting) -> bool {
        match setting {
            Setting::WatermarkDelay => self.watermark_delay_ms == other.watermark_delay_ms,
            Setting::AllowedLateness => self.allowed_lateness_ms == other.allowed_lateness_ms,
            Setting::Tick => self.tick_ms == other.tick_ms,
            Setting::TopK => self.top_k == other.top_k,
            Setting::TopKBuckets => self.top_k_buckets == other.top_k_buckets,
            Setting::Windows => self.windows == other.windows,
            Setting::MaxClicksPerMinute => self.max_clicks_per_minute == other.max_clicks_per_minute,
            Setting::Blocklist => self.blocklist == other.blocklist,
        }
    }

    /// Each setting that differs, one line each: `allowed lateness: 5m in the store, 10m now`,
    /// with `mine` and `theirs` naming the two sides.
    pub fn differences(&self, mine: &str, other: &AnswerSettings, theirs: &str) -> String {
        self.differing(other)
            .into_iter()
            .map(|s| format!("  {}: {} {mine}, {} {theirs}", s.name(), self.describe(s), other.describe(s)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Every setting of a run that changes answers, and whether it serves filter queries (which
/// changes what the dataflow keeps): what the processes of a cluster must agree on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    pub answers: AnswerSettings,
    pub serve: bool,
}

impl ClusterSettings {
    /// Each difference in the words of the command line, `mine` and `theirs` naming the sides.
    pub fn differences(&self, mine: &str, other: &ClusterSettings, theirs: &str) -> String {
        let mut lines = vec![self.answers.differences(mine, &other.answers, theirs)];
        if self.serve != other.serve {
            let says = |serve: bool| if serve { "serving (--serve)" } else { "not serving" };
            lines.push(format!("  serve: {} {mine}, {} {theirs}", says(self.serve), says(other.serve)));
        }
        lines.retain(|l| !l.is_empty());
        lines.join("\n")
    }
}

/// A duration as the command line takes it, in the largest unit that divides it: `5m`, `250ms`.
pub fn duration(ms: u64) -> String {
    match ms {
        0 => "0s".into(),
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

/// The text of stores written before the settings were typed: `watermark_delay_ms=5000
/// allowed_lateness_ms=Some(300000) tick_ms=60000 top_k=100 buckets=256,16 windows=1,5,60
/// max_clicks_per_minute=None blocklist=0:0123456789abcdef`.
fn parse_legacy(text: &str) -> Result<AnswerSettings, String> {
    let bad = |what: &str| format!("the recorded settings {text:?} cannot be read ({what})");
    let fields: std::collections::HashMap<&str, &str> = text.split_whitespace().filter_map(|f| f.split_once('=')).collect();
    let get = |key: &str| fields.get(key).copied().ok_or_else(|| bad(&format!("no {key}")));
    let number = |key: &str| get(key)?.parse::<u64>().map_err(|_| bad(key));
    let optional = |key: &str| -> Result<Option<u64>, String> {
        match get(key)? {
            "None" => Ok(None),
            some => some.strip_prefix("Some(").and_then(|s| s.strip_suffix(')')).and_then(|n| n.parse().ok()).map(Some).ok_or_else(|| bad(key)),
        }
    };
    let list = |key: &str| -> Result<Vec<u32>, String> {
        get(key)?.split(',').filter(|s| !s.is_empty()).map(|n| n.parse().map_err(|_| bad(key))).collect()
    };
    let (networks, fingerprint) = get("blocklist")?.split_once(':').ok_or_else(|| bad("blocklist"))?;
    Ok(AnswerSettings {
        watermark_delay_ms: number("watermark_delay_ms")?,
        allowed_lateness_ms: optional("allowed_lateness_ms")?,
        tick_ms: number("tick_ms")?,
        top_k: number("top_k")? as usize,
        top_k_buckets: list("buckets")?,
        windows: list("windows")?,
        max_clicks_per_minute: optional("max_clicks_per_minute")?,
        blocklist: Blocklist { networks: networks.parse().map_err(|_| bad("blocklist"))?, fingerprint: fingerprint.to_string() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What stores written before the settings were typed hold: the run's old `store_settings()`.
    const LEGACY: &str = "watermark_delay_ms=5000 allowed_lateness_ms=Some(300000) tick_ms=60000 top_k=100 buckets=256,16 \
                          windows=1,5,60 max_clicks_per_minute=None blocklist=0:831154110e30ac6a";

    #[test]
    fn legacy_text_reads_as_the_same_settings() {
        // The default settings, written by the last build with the text format: equal as data,
        // the empty blocklist's fingerprint included.
        let expected = AnswerSettings::of(&EventTimeRules { tick_ms: 60_000, ..Default::default() }, &Plan::default());
        assert_eq!(AnswerSettings::parse(LEGACY), Ok(expected));
        let reconciling = LEGACY.replace("Some(300000)", "None").replace("windows=1,5,60", "windows=").replace("=None b", "=Some(25) b");
        let read = AnswerSettings::parse(&reconciling).unwrap();
        assert_eq!((read.allowed_lateness_ms, read.windows.len(), read.max_clicks_per_minute), (None, 0, Some(25)));
        assert!(AnswerSettings::parse("watermark_delay_ms=5000").unwrap_err().contains("cannot be read (no "));
        assert!(AnswerSettings::parse(&LEGACY.replace("tick_ms=60000", "tick_ms=soon")).is_err());
    }

    #[test]
    fn json_round_trips_and_blocklists_keep_their_old_fingerprint() {
        let settings = AnswerSettings::of(&EventTimeRules::default(), &Plan::default());
        assert_eq!(AnswerSettings::parse(&settings.to_json()), Ok(settings.clone()));
        // The fingerprint is the one the old text recorded: its hash of the list's debug form.
        let old = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(format!("{:?}", Vec::<clickagg_dataflows::IpNet>::new()).as_bytes()));
        assert_eq!(settings.blocklist, Blocklist { networks: 0, fingerprint: old });
    }

    #[test]
    fn differences_are_said_in_the_command_lines_words() {
        let store = AnswerSettings::of(&EventTimeRules::default(), &Plan::default());
        let mut now = store.clone();
        now.allowed_lateness_ms = Some(600_000);
        now.windows = vec![1, 5];
        now.max_clicks_per_minute = Some(40);
        let said = store.differences("in the store", &now, "now");
        assert_eq!(
            said,
            "  allowed lateness: 5m in the store, 10m now\n  windows: 1m,5m,60m in the store, 1m,5m now\n  \
             max clicks per minute: none in the store, 40 now"
        );
        assert!(store.differing(&store).is_empty());
        assert_eq!([duration(250), duration(5_000), duration(3_600_000), duration(90_000)], ["250ms", "5s", "1h", "90s"]);
    }
}
