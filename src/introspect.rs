//! What the dataflow holds, from timely's and differential's own logging: every operator with
//! its name and address and the time it has been scheduled, and for each arrangement the
//! records and batches its trace holds now.
//! The server's `/v1/introspection/*` and the shell's `arrangements` and `dataflow` read it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use differential_dataflow::logging::{DifferentialEvent, DifferentialEventBuilder};
use timely::logging::{StartStop, TimelyEvent, TimelyEventBuilder};
use timely::worker::Worker;

/// One operator of one worker.
#[derive(Clone, Debug, Default)]
pub struct OperatorInfo {
    pub name: String,
    /// The path of scope indices from the dataflow's root (timely's address).
    pub address: Vec<usize>,
    /// Updates held by the operator's trace, if it maintains one.
    pub records: i64,
    /// Batches in that trace.
    pub batches: i64,
    /// Whether differential reported any batch for it: it is an arrangement.
    pub arranges: bool,
    /// Batches ever created, merges and drops aside.
    pub batches_created: u64,
    /// Nanoseconds between the operator's `Schedule` start and stop events, summed: a region's
    /// time includes that of the operators inside it.
    pub scheduled_ns: u64,
    /// How many times it was scheduled.
    pub schedules: u64,
}

/// Operators of every worker of this process, by `(worker, operator id)`.
#[derive(Debug, Default)]
pub struct Introspection {
    pub operators: BTreeMap<(usize, usize), OperatorInfo>,
}

/// Shared between the workers (writers) and the server (reader).
pub type SharedIntrospection = Arc<Mutex<Introspection>>;

/// Registers this worker's loggers; call before building the dataflow, so that every
/// operator's creation is seen.
pub fn install(worker: &mut Worker, shared: SharedIntrospection) {
    let index = worker.index();
    let Some(mut registry) = worker.log_register() else { return };
    let operators = Arc::clone(&shared);
    // Operators being scheduled, innermost last (a region schedules its operators inside its
    // own start and stop), and the time each was scheduled since the last flush, by id.
    let mut running: Vec<(usize, std::time::Duration)> = Vec::new();
    let mut scheduled: Vec<(u64, u64)> = Vec::new();
    registry.insert::<TimelyEventBuilder, _>("timely", move |_time, batch| {
        let Some(events) = batch else { return };
        let mut created = Vec::new();
        for (time, event) in events.iter() {
            match event {
                TimelyEvent::Operates(op) => created.push(op.clone()),
                TimelyEvent::Schedule(e) => match e.start_stop {
                    StartStop::Start => running.push((e.id, *time)),
                    StartStop::Stop => {
                        // Starts and stops nest; a stop without its start (logging began
                        // mid-schedule) is skipped.
                        if let Some(at) = running.iter().rposition(|(id, _)| *id == e.id) {
                            let (_, started) = running[at];
                            running.truncate(at);
                            if scheduled.len() <= e.id {
                                scheduled.resize(e.id + 1, (0, 0));
                            }
                            let entry = &mut scheduled[e.id];
                            entry.0 += time.saturating_sub(started).as_nanos() as u64;
                            entry.1 += 1;
                        }
                    }
                },
                _ => {}
            }
        }
        let ran = scheduled.iter().any(|&(_, n)| n > 0);
        if created.is_empty() && !ran {
            return;
        }
        if let Ok(mut state) = operators.lock() {
            for op in created {
                let info = state.operators.entry((index, op.id)).or_default();
                info.name = op.name;
                info.address = op.addr;
            }
            for (id, (ns, runs)) in scheduled.iter_mut().enumerate().filter(|(_, (_, runs))| *runs > 0) {
                let info = state.operators.entry((index, id)).or_default();
                info.scheduled_ns += std::mem::take(ns);
                info.schedules += std::mem::take(runs);
            }
        }
    });
    registry.insert::<DifferentialEventBuilder, _>("differential/arrange", move |_time, batch| {
        let Some(events) = batch else { return };
        let Ok(mut state) = shared.lock() else { return };
        for (_, event) in events.iter() {
            // The spine's events balance (differential's logging docs): one batch in per Batch,
            // two out and one in per completed Merge, one out per Drop.
            let (operator, records, batches) = match event {
                DifferentialEvent::Batch(e) => (e.operator, e.length as i64, 1),
                DifferentialEvent::Merge(e) => match e.complete {
                    Some(merged) => (e.operator, merged as i64 - e.length1 as i64 - e.length2 as i64, -1),
                    None => continue,
                },
                DifferentialEvent::Drop(e) => (e.operator, -(e.length as i64), -1),
                _ => continue,
            };
            let info = state.operators.entry((index, operator)).or_default();
            info.records += records;
            info.batches += batches;
            info.arranges = true;
            if let DifferentialEvent::Batch(_) = event {
                info.batches_created += 1;
            }
        }
    });
}

/// One operator summed over the workers of this process.
#[derive(Clone, Debug)]
pub struct OperatorSummary {
    pub id: usize,
    /// Name and address from the first worker; records and batches summed over all.
    pub total: OperatorInfo,
    /// Records per worker, in worker order.
    pub per_worker: Vec<i64>,
}

impl Introspection {
    /// Every operator, summed over workers (each worker builds the same dataflow, so operator
    /// ids agree), in id order.
    pub fn summary(&self) -> Vec<OperatorSummary> {
        let mut by_id: BTreeMap<usize, OperatorSummary> = BTreeMap::new();
        for (&(worker, id), info) in &self.operators {
            let entry = by_id.entry(id).or_insert_with(|| OperatorSummary { id, total: OperatorInfo::default(), per_worker: Vec::new() });
            let total = &mut entry.total;
            if total.name.is_empty() {
                total.name = info.name.clone();
                total.address = info.address.clone();
            }
            total.records += info.records;
            total.batches += info.batches;
            total.arranges |= info.arranges;
            total.batches_created += info.batches_created;
            total.scheduled_ns += info.scheduled_ns;
            total.schedules += info.schedules;
            if entry.per_worker.len() <= worker {
                entry.per_worker.resize(worker + 1, 0);
            }
            entry.per_worker[worker] += info.records;
        }
        by_id.into_values().collect()
    }
}
