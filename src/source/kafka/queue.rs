//! One partition's message queue, split off its worker's consumer, read a batch of messages at
//! a time with librdkafka's `rd_kafka_consume_batch_queue`.
//!
//! Measured reason for the raw calls: through the `rdkafka` crate's `PartitionQueue::poll`, each
//! message was one event, one queue lock and two clock reads; a 2M-click replay from a topic spent
//! 1.7 CPU-s more than the same replay from files, 5% of its CPU in `clock_gettime` alone. The
//! batch call takes up to [`BATCH`] messages under one lock. The unsafe code is all here.

use std::ffi::{c_int, CStr, CString};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer};

/// Messages taken from librdkafka per call.
const BATCH: usize = 1024;

/// A partition's own queue of fetched messages.
pub struct PartitionQueue {
    queue: NonNull<rd::rd_kafka_queue_t>,
    /// Messages taken from the queue and not yet handed out: `batch[taken..]`.
    batch: Vec<*mut rd::rd_kafka_message_t>,
    taken: usize,
    topic: CString,
    partition: i32,
    /// The client the queue belongs to, which must outlive it (fields drop in order: the
    /// queue and its messages first).
    client: Arc<BaseConsumer>,
}

/// One message, destroyed when dropped.
pub struct Taken<'a> {
    message: NonNull<rd::rd_kafka_message_t>,
    _queue: std::marker::PhantomData<&'a mut PartitionQueue>,
}

impl Taken<'_> {
    /// The message's error, if it carries one instead of data (e.g. its offset is out of range).
    pub fn error(&self) -> Option<String> {
        // SAFETY: `message` is a live message until this guard drops.
        let message = unsafe { self.message.as_ref() };
        if message.err == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            return None;
        }
        // SAFETY: librdkafka returns a static or message-owned NUL-terminated string.
        let text = unsafe { CStr::from_ptr(rd::rd_kafka_message_errstr(self.message.as_ptr())) };
        Some(text.to_string_lossy().into_owned())
    }

    pub fn offset(&self) -> i64 {
        // SAFETY: as in `error`.
        unsafe { self.message.as_ref() }.offset
    }

    /// The message's value (`None`: a null value).
    pub fn payload(&self) -> Option<&[u8]> {
        // SAFETY: as in `error`; `payload` points to `len` bytes owned by the message.
        let message = unsafe { self.message.as_ref() };
        (!message.payload.is_null()).then(|| unsafe { std::slice::from_raw_parts(message.payload as *const u8, message.len) })
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        // SAFETY: each message taken from the batch is destroyed once, here.
        unsafe { rd::rd_kafka_message_destroy(self.message.as_ptr()) }
    }
}

impl PartitionQueue {
    /// Splits partition `partition` of `topic` off `consumer`'s queue (after it was assigned):
    /// from now on its messages come only here. `None` if the client does not know the partition.
    pub fn split(consumer: &Arc<BaseConsumer>, topic: &str, partition: i32) -> Option<PartitionQueue> {
        let topic = CString::new(topic).ok()?;
        // SAFETY: the client is live; librdkafka returns a new reference to the partition's
        // queue (or null), released in `Drop`; forwarding to null keeps its messages here.
        let queue = unsafe {
            let queue = rd::rd_kafka_queue_get_partition(consumer.client().native_ptr(), topic.as_ptr(), partition);
            let queue = NonNull::new(queue)?;
            rd::rd_kafka_queue_forward(queue.as_ptr(), std::ptr::null_mut());
            queue
        };
        Some(PartitionQueue { queue, batch: Vec::with_capacity(BATCH), taken: 0, topic, partition, client: Arc::clone(consumer) })
    }

    /// The next message, waiting up to `wait` for one when none is taken yet; `None` if none came.
    pub fn next(&mut self, wait: Duration) -> Option<Taken<'_>> {
        if self.taken == self.batch.len() {
            self.fill(Duration::ZERO);
            if self.batch.is_empty() && !wait.is_zero() {
                self.fill(wait);
            }
        }
        let message = *self.batch.get(self.taken)?;
        self.taken += 1;
        Some(Taken { message: NonNull::new(message)?, _queue: std::marker::PhantomData })
    }

    /// The partition's high watermark from the broker's latest fetch response (librdkafka's
    /// cached value: no request is made), `None` before the first.
    pub fn cached_high_watermark(&self) -> Option<u64> {
        let (mut low, mut high) = (-1i64, -1i64);
        // SAFETY: the client is live (`client`), `topic` is a valid C string, and librdkafka
        // only writes the two integers.
        let error = unsafe {
            rd::rd_kafka_get_watermark_offsets(self.client.client().native_ptr(), self.topic.as_ptr(), self.partition, &mut low, &mut high)
        };
        (error == rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR && high >= 0).then_some(high as u64)
    }

    /// Takes what the queue holds, up to [`BATCH`] messages, waiting up to `wait` for them.
    fn fill(&mut self, wait: Duration) {
        self.batch.clear();
        self.taken = 0;
        let timeout = wait.as_millis().min(c_int::MAX as u128) as c_int;
        // SAFETY: `batch` has room for BATCH pointers; librdkafka writes `taken` of them, each a
        // message this queue now owns (destroyed by `Taken` or by `Drop`).
        let taken = unsafe { rd::rd_kafka_consume_batch_queue(self.queue.as_ptr(), timeout, self.batch.as_mut_ptr(), BATCH) };
        if taken > 0 {
            // SAFETY: librdkafka initialised the first `taken` (≤ BATCH) entries.
            unsafe { self.batch.set_len(taken as usize) };
        }
    }
}

impl Drop for PartitionQueue {
    fn drop(&mut self) {
        // SAFETY: the messages not handed out are still owned here; the queue reference is ours.
        unsafe {
            for &message in &self.batch[self.taken..] {
                rd::rd_kafka_message_destroy(message);
            }
            rd::rd_kafka_queue_destroy(self.queue.as_ptr());
        }
    }
}
