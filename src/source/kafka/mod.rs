//! Kafka topic partitions as SPEC §5 partitions: partition `N` of topic `T` is the partition
//! named `T-N`, its position is the Kafka offset of the next message to read, and each message's
//! value is one line, parsed by the configured column order (a topic has no header line).
//!
//! The offsets that count are the ones the store commits with the answers; the consumer group
//! is never asked where to start, and nothing is committed to it ([`consumer_config`]). A replay
//! reads every partition up to the high watermark it had when the run started
//! ([`describe`]); follow mode tails them.
//!
//! What cannot be read is an error that names it, never a skip: an unreachable broker or a
//! missing topic at the start, a committed offset below the partition's first retained one,
//! and a gap between two messages' offsets (deleted or compacted messages; see [`feed`]).

pub mod feed;
pub mod produce;
pub mod queue;

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::parse::{Header, COLUMNS};

/// Where a run reads its partitions from when they are Kafka topic partitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaSpec {
    /// librdkafka's `bootstrap.servers`: `host:port[,host:port…]`.
    pub brokers: String,
    pub topic: String,
    /// The column order of every message, as a header line would give it.
    pub columns: String,
    /// The consumer group librdkafka is given (it wants one even though partitions are
    /// assigned, not subscribed). No offset is committed to it.
    pub group: String,
}

impl KafkaSpec {
    /// A topic read with SPEC §1's column order unless `columns` says otherwise.
    pub fn new(brokers: &str, topic: &str, columns: Option<&str>) -> Result<KafkaSpec, String> {
        if brokers.trim().is_empty() {
            return Err("--kafka needs the brokers, host:port[,host:port…]".into());
        }
        if topic.is_empty() || !topic.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            return Err(format!("--topic {topic:?} is not a Kafka topic name (letters, digits, '.', '_' and '-')"));
        }
        let columns = columns.map_or_else(|| COLUMNS.join(","), str::to_string);
        Header::parse(columns.as_bytes()).map_err(|e| format!("--columns {columns:?}: {e}"))?;
        Ok(KafkaSpec { brokers: brokers.to_string(), topic: topic.to_string(), columns, group: format!("clickagg-{topic}") })
    }

    /// The column order as a parsed header.
    pub fn header(&self) -> Header {
        Header::parse(self.columns.as_bytes()).expect("checked by KafkaSpec::new")
    }

    /// How the run's partitions are described in the store and the status: `kafka://BROKERS/TOPIC`.
    pub fn location(&self) -> String {
        format!("kafka://{}/{}", self.brokers, self.topic)
    }
}

/// The name of partition `number` of `topic` (SPEC §5).
pub fn partition_name(topic: &str, number: i32) -> String {
    format!("{topic}-{number}")
}

/// The Kafka partition number of a partition named `TOPIC-N`.
pub fn partition_number(topic: &str, name: &str) -> Option<i32> {
    name.strip_prefix(topic)?.strip_prefix('-')?.parse().ok().filter(|n: &i32| *n >= 0)
}

/// A topic's partitions at one moment, in name order (the order that numbers partitions, as
/// for files).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicPartitions {
    pub names: Vec<String>,
    /// Each name's Kafka partition number.
    pub numbers: Vec<i32>,
    /// The first offset still retained, per partition.
    pub low: Vec<u64>,
    /// The offset the next message will get (the high watermark), per partition.
    pub high: Vec<u64>,
}

impl TopicPartitions {
    /// The position of the partition named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }
}

/// How long the start waits for the brokers before it calls them unreachable.
fn start_timeout() -> Duration {
    let ms = std::env::var("CLICKAGG_KAFKA_TIMEOUT_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    Duration::from_millis(ms)
}

/// The consumer settings every reader uses. Offsets are never committed to the group nor stored
/// by librdkafka, and a position that is out of range is an error, never a silent reset to the
/// earliest or latest offset (`auto.offset.reset=error`).
pub fn consumer_config(spec: &KafkaSpec, client: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &spec.brokers)
        .set("group.id", &spec.group)
        .set("client.id", client)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "error")
        .set("allow.auto.create.topics", "false")
        // The prefetch per partition: librdkafka's default (64 MiB) per partition would make a
        // follower's memory grow with the partitions it reads, not with retention.
        .set("queued.max.messages.kbytes", "16384")
        // One fetch brings up to 8 MiB of a partition (librdkafka's default, 1 MiB, is about
        // 13,000 clicks: a replay waited on round trips).
        .set("fetch.message.max.bytes", "8388608")
        .set("fetch.max.bytes", "67108864")
        .set("fetch.wait.max.ms", "50")
        .set("log_level", "3");
    config
}

/// The topic's partitions and their low and high watermarks, read at the start. An unreachable
/// broker or a missing topic is an error that says which.
pub fn describe(spec: &KafkaSpec) -> Result<TopicPartitions, String> {
    let consumer: BaseConsumer = consumer_config(spec, "clickagg-describe")
        .create()
        .map_err(|e| format!("cannot create a Kafka client for {}: {e}", spec.brokers))?;
    let timeout = start_timeout();
    let metadata = consumer.fetch_metadata(Some(&spec.topic), timeout).map_err(|e| {
        format!("cannot reach the Kafka brokers {} (waited {} s): {e}", spec.brokers, timeout.as_secs_f64())
    })?;
    let Some(topic) = metadata.topics().iter().find(|t| t.name() == spec.topic) else {
        return Err(format!("the brokers {} do not list topic {}", spec.brokers, spec.topic));
    };
    if let Some(error) = topic.error() {
        let error = rdkafka::error::RDKafkaErrorCode::from(error);
        return Err(format!("topic {} on {}: {error} (create it, or load it with `clickagg produce`)", spec.topic, spec.brokers));
    }
    if topic.partitions().is_empty() {
        return Err(format!("topic {} on {} has no partitions", spec.topic, spec.brokers));
    }
    let mut numbered: Vec<(String, i32)> =
        topic.partitions().iter().map(|p| (partition_name(&spec.topic, p.id()), p.id())).collect();
    numbered.sort();
    let mut partitions = TopicPartitions::default();
    for (name, number) in numbered {
        let (low, high) = consumer
            .fetch_watermarks(&spec.topic, number, timeout)
            .map_err(|e| format!("cannot read the offsets of {name} from {}: {e}", spec.brokers))?;
        partitions.names.push(name);
        partitions.numbers.push(number);
        partitions.low.push(low.max(0) as u64);
        partitions.high.push(high.max(0) as u64);
    }
    Ok(partitions)
}

/// The number of partitions `spec`'s topic has now (follow mode looks for new ones).
pub fn partition_count(consumer: &BaseConsumer, spec: &KafkaSpec, timeout: Duration) -> Option<usize> {
    let metadata = consumer.fetch_metadata(Some(&spec.topic), timeout).ok()?;
    let topic = metadata.topics().iter().find(|t| t.name() == spec.topic)?;
    topic.error().is_none().then(|| topic.partitions().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_names_round_trip_and_refuse_other_topics() {
        assert_eq!(partition_name("clicks", 7), "clicks-7");
        assert_eq!(partition_number("clicks", "clicks-7"), Some(7));
        assert_eq!(partition_number("clicks", "clicks-x"), None);
        assert_eq!(partition_number("clicks", "clicks2-1"), None);
        assert_eq!(partition_number("my-topic", "my-topic-12"), Some(12));
    }

    #[test]
    fn a_spec_checks_its_topic_and_columns() {
        assert!(KafkaSpec::new("127.0.0.1:9092", "clicks", None).is_ok());
        assert!(KafkaSpec::new("", "clicks", None).unwrap_err().contains("brokers"));
        assert!(KafkaSpec::new("b:1", "a b", None).unwrap_err().contains("topic name"));
        let error = KafkaSpec::new("b:1", "t", Some("event_id,ts")).unwrap_err();
        assert!(error.contains("--columns"), "{error}");
        let reordered = KafkaSpec::new("b:1", "t", Some("ts,event_id,country,ip,user_id,campaign_id,ad_id")).unwrap();
        assert_eq!(reordered.location(), "kafka://b:1/t");
    }
}
