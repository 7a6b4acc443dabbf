//! A worker's Kafka partitions as feeds of lines: one consumer per worker, assigned its
//! partitions at the offsets to read from, with each partition's messages in a queue of its own,
//! so that the reader can take lines from the partition furthest behind in event time, as it
//! does with files.
//!
//! Each message is one line. Its offset is the line's position, and the feed's position is the
//! offset of the next message it expects: a message whose offset is past that is a gap (the
//! messages between were deleted by retention or compacted away), an error naming the lost
//! offsets, which stops the partition.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::queue::PartitionQueue;
use super::{consumer_config, KafkaSpec};
use crate::source::parse::MAX_LINE_BYTES;
use crate::source::reader::Line;

/// How long a replay waits without a message, below the end it saw at the start, before it
/// calls the partition unreadable (the broker went away, or the partition's leader has none).
const STALLED_AFTER: Duration = Duration::from_secs(60);

/// One partition a worker reads: where it starts, and (in a replay) where it ends.
#[derive(Clone, Debug)]
pub struct Assigned {
    pub name: String,
    pub number: i32,
    /// The offset of the first message to read.
    pub from: u64,
    /// Replay: the high watermark seen at the start; the partition is read up to it.
    pub end: Option<u64>,
}

/// The consumer of one worker: its partitions' queues are split off it, and what reaches its
/// own queue (errors, and messages fetched before a split) is served by [`drain`].
pub struct WorkerConsumer {
    consumer: Arc<BaseConsumer>,
    spec: KafkaSpec,
}

impl WorkerConsumer {
    pub fn new(spec: &KafkaSpec, worker: usize) -> Result<WorkerConsumer, String> {
        let consumer: BaseConsumer = consumer_config(spec, &format!("clickagg-worker-{worker}"))
            .create()
            .map_err(|e| format!("cannot create a Kafka consumer for {}: {e}", spec.brokers))?;
        Ok(WorkerConsumer { consumer: Arc::new(consumer), spec: spec.clone() })
    }

    /// Adds `partitions` to the consumer's assignment, each from its offset, and returns their
    /// feeds. Messages that reached the consumer's own queue before the split are handed to
    /// their feeds first, so that no feed ever sees a later message before an earlier one.
    pub fn assign(&self, partitions: Vec<Assigned>) -> Result<Vec<KafkaFeed>, String> {
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        let mut list = TopicPartitionList::new();
        for p in &partitions {
            list.add_partition_offset(&self.spec.topic, p.number, Offset::Offset(p.from as i64))
                .map_err(|e| format!("cannot assign {}: {e}", p.name))?;
        }
        self.consumer.incremental_assign(&list).map_err(|e| format!("cannot assign partitions of {}: {e}", self.spec.topic))?;
        let mut feeds = Vec::new();
        for p in partitions {
            let queue = PartitionQueue::split(&self.consumer, &self.spec.topic, p.number)
                .ok_or_else(|| format!("cannot read {}: the client has no queue for it", p.name))?;
            feeds.push(KafkaFeed {
                queue,
                consumer: Arc::clone(&self.consumer),
                name: p.name,
                topic: self.spec.topic.clone(),
                number: p.number,
                next: p.from,
                end: p.end,
                early: VecDeque::new(),
                line: Vec::new(),
                waiting_since: None,
            });
        }
        for message in drain(&self.consumer)? {
            if let Some(feed) = feeds.iter_mut().find(|f| f.number == message.partition()) {
                feed.early.push_back(message);
            }
        }
        Ok(feeds)
    }

    /// What the consumer reads.
    pub fn spec(&self) -> &KafkaSpec {
        &self.spec
    }

    /// The underlying client, for metadata.
    pub fn client(&self) -> &BaseConsumer {
        &self.consumer
    }
}

/// Serves a consumer's own queue: the messages on it (fetched before their partition's queue was
/// split off), and its errors, of which the fatal one is returned and the transient ones (a
/// broker down for a moment) are reported, since librdkafka retries them.
fn drain(consumer: &BaseConsumer) -> Result<Vec<OwnedMessage>, String> {
    let mut messages = Vec::new();
    while let Some(result) = consumer.poll(Duration::ZERO) {
        match result {
            Ok(message) => messages.push(message.detach()),
            Err(rdkafka::error::KafkaError::MessageConsumption(code)) if is_transient(code) => {
                eprintln!("clickagg: kafka: {code} (retrying)");
            }
            Err(e) => return Err(format!("kafka: {e}")),
        }
    }
    Ok(messages)
}

fn is_transient(code: rdkafka::error::RDKafkaErrorCode) -> bool {
    use rdkafka::error::RDKafkaErrorCode::*;
    matches!(code, BrokerTransportFailure | AllBrokersDown | OperationTimedOut | NetworkException | RequestTimedOut)
}

/// One partition's messages, as lines.
pub struct KafkaFeed {
    queue: PartitionQueue,
    consumer: Arc<BaseConsumer>,
    name: String,
    topic: String,
    number: i32,
    /// The offset of the next message expected.
    next: u64,
    end: Option<u64>,
    /// Messages of this partition that reached the consumer's own queue before the split.
    early: VecDeque<OwnedMessage>,
    /// The current line's bytes (a message's value, without a trailing line end).
    line: Vec<u8>,
    /// Since when polls have found no message (`None` after a message).
    waiting_since: Option<Instant>,
}

impl KafkaFeed {
    /// The offset of the next message to read: every message before it has been read.
    pub fn offset(&self) -> u64 {
        self.next
    }

    /// A replay's partition is read to the end it had at the start.
    pub fn at_end(&self) -> bool {
        self.end.is_some_and(|end| self.next >= end)
    }

    /// The partition's name, `TOPIC-N`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether every message the partition had at the last fetch is read: the offset has reached
    /// the high watermark the broker sent with its latest fetch response. `false` before the
    /// first response: an empty queue then says nothing about the partition (the fetch is on its
    /// way), and taking the partition for idle would let the watermark pass its messages.
    pub fn caught_up(&self) -> bool {
        self.at_end() || self.high_watermark().is_some_and(|high| self.next >= high)
    }

    /// The partition's high watermark from the broker's latest fetch response (librdkafka's
    /// cached value: no request is made), `None` before the first. Recorded for the server's
    /// lag in messages ([`crate::model::positions`]).
    fn high_watermark(&self) -> Option<u64> {
        let high = self.queue.cached_high_watermark()?;
        crate::model::positions::record_end(&self.name, high);
        Some(high)
    }

    /// An error the partition's queue reported, with the offsets it lost when the position to
    /// read from is no longer in the partition (retention deleted it while this run read it:
    /// librdkafka's `auto.offset.reset=error` reports it instead of jumping ahead).
    fn explain(&self, error: &str) -> String {
        let low = self.consumer.fetch_watermarks(&self.topic, self.number, Duration::from_secs(5)).ok().map(|(low, _)| low.max(0) as u64);
        match low {
            Some(low) if low > self.next => format!(
                "offsets {} to {} of {} were deleted from the topic (retention) before this run read them: their \
                 clicks cannot be counted, and are not skipped ({error})",
                self.next,
                low - 1,
                self.name
            ),
            _ => error.to_string(),
        }
    }

    /// Whether this feed is a replay's (it has an end).
    pub fn is_bounded(&self) -> bool {
        self.end.is_some()
    }

    /// The next line, or `None` when no message is there now (or at a replay's end). Waits up to
    /// `wait` for one.
    pub fn next_line(&mut self, wait: Duration) -> io::Result<Option<Line<'_>>> {
        loop {
            if self.at_end() {
                self.high_watermark();
                return Ok(None);
            }
            let mut failed = None;
            let (offset, taken) = match self.early.pop_front() {
                Some(message) => (message.offset(), take_value(&mut self.line, message.payload())),
                None => match self.queue.next(wait) {
                    None => {
                        // Errors of the client as a whole arrive on its own queue.
                        for message in drain(&self.consumer).map_err(io::Error::other)? {
                            if message.partition() == self.number {
                                self.early.push_back(message);
                            }
                        }
                        if !self.early.is_empty() {
                            continue;
                        }
                        // Timed from the first empty poll since the last message (a clock read per
                        // message cost 5% of a replay's CPU).
                        let waiting = *self.waiting_since.get_or_insert_with(Instant::now);
                        if self.end.is_some() && waiting.elapsed() >= STALLED_AFTER {
                            return Err(io::Error::other(format!(
                                "no message for {} s at offset {} of {}, below the end {} it had at the start \
                                 (is the broker up?)",
                                STALLED_AFTER.as_secs(),
                                self.next,
                                self.name,
                                self.end.unwrap_or_default()
                            )));
                        }
                        return Ok(None);
                    }
                    Some(message) => match message.error() {
                        Some(e) => {
                            failed = Some(e);
                            (0, 0)
                        }
                        None => (message.offset(), take_value(&mut self.line, message.payload())),
                    },
                },
            };
            if let Some(error) = failed {
                return Err(io::Error::other(self.explain(&error)));
            }
            let offset = offset.max(0) as u64;
            self.waiting_since = None;
            if offset < self.next {
                // Already read (librdkafka may fetch a message twice across a reconnection).
                continue;
            }
            if offset > self.next {
                return Err(io::Error::other(format!(
                    "offsets {} to {} of {} are missing (deleted by retention or compacted away): \
                     their clicks cannot be read, and are not skipped",
                    self.next,
                    offset - 1,
                    self.name
                )));
            }
            self.next = offset + 1;
            if self.next.is_multiple_of(4096) {
                // The lag the server reports stays current while messages keep coming.
                self.high_watermark();
            }
            return Ok(Some(if taken > MAX_LINE_BYTES {
                Line::TooLong { offset, prefix: &self.line[..MAX_LINE_BYTES] }
            } else {
                Line::Complete { offset, bytes: &self.line }
            }));
        }
    }
}

/// Copies a message's value into `line`, without one trailing `\n` or `\r\n`, keeping at most a
/// line's limit (and a byte more, to tell an overlong one). Returns the value's length without
/// the line end.
fn take_value(line: &mut Vec<u8>, value: Option<&[u8]>) -> usize {
    let mut value = value.unwrap_or_default();
    if let [rest @ .., b'\n'] = value {
        value = rest;
    }
    if let [rest @ .., b'\r'] = value {
        value = rest;
    }
    line.clear();
    line.extend_from_slice(&value[..value.len().min(MAX_LINE_BYTES + 1)]);
    value.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_loses_its_line_end_and_is_cut_at_the_limit() {
        let mut line = Vec::new();
        assert_eq!(take_value(&mut line, Some(b"a,b\r\n")), 3);
        assert_eq!(line, b"a,b");
        assert_eq!(take_value(&mut line, Some(b"a,b\n")), 3);
        assert_eq!(take_value(&mut line, None), 0);
        assert!(line.is_empty());
        let long = vec![b'x'; MAX_LINE_BYTES + 100];
        assert_eq!(take_value(&mut line, Some(&long)), MAX_LINE_BYTES + 100);
        assert_eq!(line.len(), MAX_LINE_BYTES + 1);
    }
}
