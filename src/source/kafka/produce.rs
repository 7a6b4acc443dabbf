//! `clickagg produce`: loads a log directory into a topic, the lines of partition file `i` (in
//! name order) into topic partition `i`, one message per line, in order. For tests, demos and
//! benchmarks of the Kafka source: a replay of the topic then reads the same lines as a replay of
//! the directory.
//!
//! The files' header lines are not sent (a topic has none); every file must have the same one,
//! and `run --kafka` must be given it as `--columns` when it is not SPEC §1's order. A last line
//! without its newline is not sent either: it is not a line yet (SPEC §1).

use std::io::BufRead;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::ClientContext;

use super::{describe, KafkaSpec};
use crate::source::list_partitions;
use crate::source::parse::COLUMNS;

/// What `produce` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Produced {
    pub messages: u64,
    pub partitions: usize,
    /// Whether the topic was created (with one partition per file).
    pub created: bool,
    /// The files' column order, to give `run --kafka` as `--columns` when it is not SPEC §1's.
    pub columns: String,
    /// Files whose last line had no newline, which was not sent.
    pub unterminated: Vec<String>,
}

/// Counts the messages the brokers did not take.
#[derive(Default)]
struct Deliveries {
    failed: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut first) = self.first_error.lock() {
                first.get_or_insert_with(|| error.to_string());
            }
        }
    }
}

/// Loads `logs` into `brokers`/`topic`, creating the topic with one partition per file when it
/// does not exist. A topic with fewer partitions than files is refused.
pub fn produce(brokers: &str, topic: &str, logs: &Path) -> Result<Produced, String> {
    let paths = list_partitions(logs)?;
    if paths.is_empty() {
        return Err(format!("no partition files (part-NNNNN.csv) in {}", logs.display()));
    }
    let spec = KafkaSpec::new(brokers, topic, None)?;
    let created = ensure_topic(&spec, paths.len())?;
    let deliveries = Deliveries::default();
    let producer: BaseProducer<Deliveries> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("client.id", "clickagg-produce")
        .set("linger.ms", "20")
        .set("batch.num.messages", "100000")
        .set("batch.size", "4000000")
        .set("queue.buffering.max.messages", "1000000")
        .set("queue.buffering.max.kbytes", "1048576")
        .set("enable.idempotence", "true")
        .set("log_level", "3")
        .create_with_context(deliveries)
        .map_err(|e| format!("cannot create a Kafka producer for {brokers}: {e}"))?;
    let mut produced = Produced { partitions: paths.len(), created, ..Default::default() };
    let mut header: Option<Vec<u8>> = None;
    for (partition, path) in paths.iter().enumerate() {
        let file = std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let mut line = Vec::new();
        let mut first = true;
        loop {
            line.clear();
            let read = reader.read_until(b'\n', &mut line).map_err(|e| format!("reading {}: {e}", path.display()))?;
            if read == 0 {
                break;
            }
            if line.last() != Some(&b'\n') {
                produced.unterminated.push(crate::source::partition_name(path));
                break;
            }
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if first {
                first = false;
                match &header {
                    None => header = Some(line.clone()),
                    Some(seen) if *seen == line => {}
                    Some(seen) => {
                        return Err(format!(
                            "{} has the header {:?} but the files before it have {:?}: a topic has one column order",
                            path.display(),
                            String::from_utf8_lossy(&line),
                            String::from_utf8_lossy(seen)
                        ))
                    }
                }
                continue;
            }
            send(&producer, topic, partition as i32, &line)?;
            produced.messages += 1;
        }
    }
    producer.flush(Duration::from_secs(120)).map_err(|e| format!("the brokers did not take every message: {e}"))?;
    let failed = producer.context().failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = producer.context().first_error.lock().ok().and_then(|e| e.clone()).unwrap_or_default();
        return Err(format!("{failed} of {} messages were not delivered to {topic} (first error: {first})", produced.messages));
    }
    produced.columns = header.map(|h| String::from_utf8_lossy(&h).into_owned()).unwrap_or_else(|| COLUMNS.join(","));
    Ok(produced)
}

/// Sends one message, waiting while the producer's queue is full.
fn send(producer: &BaseProducer<Deliveries>, topic: &str, partition: i32, line: &[u8]) -> Result<(), String> {
    let mut record = BaseRecord::to(topic).partition(partition).payload(line);
    loop {
        match producer.send::<[u8], [u8]>(record) {
            Ok(()) => return Ok(()),
            Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                record = back;
                producer.poll(Duration::from_millis(10));
            }
            Err((e, _)) => return Err(format!("cannot send to {topic} partition {partition}: {e}")),
        }
    }
}

/// Creates the topic with `partitions` partitions when it does not exist; refuses one with fewer.
/// Returns whether it was created.
fn ensure_topic(spec: &KafkaSpec, partitions: usize) -> Result<bool, String> {
    match describe(spec) {
        Ok(existing) if existing.names.len() >= partitions => return Ok(false),
        Ok(existing) => {
            return Err(format!(
                "topic {} has {} partitions, fewer than the {partitions} partition files: file i goes to partition i",
                spec.topic,
                existing.names.len()
            ))
        }
        Err(e) if e.contains("cannot reach") => return Err(e),
        Err(_) => {}
    }
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &spec.brokers)
        .set("log_level", "3")
        .create()
        .map_err(|e| format!("cannot create a Kafka admin client for {}: {e}", spec.brokers))?;
    let topic = NewTopic::new(&spec.topic, partitions as i32, TopicReplication::Fixed(1));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a runtime for the admin client: {e}"))?;
    let results = runtime
        .block_on(admin.create_topics([&topic], &options))
        .map_err(|e| format!("cannot create topic {}: {e}", spec.topic))?;
    for result in results {
        result.map_err(|(name, code)| format!("cannot create topic {name}: {code}"))?;
    }
    // The new topic's partitions must have leaders before messages go to them.
    for _ in 0..100 {
        if describe(spec).is_ok_and(|t| t.names.len() >= partitions) {
            return Ok(true);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("topic {} was created but its {partitions} partitions did not appear within 10 s", spec.topic))
}
