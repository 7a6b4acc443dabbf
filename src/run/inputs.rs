//! A worker's inputs to the dataflow.

use differential_dataflow::input::InputSession;
use timely::container::{ContainerBuilder, PushInto};
use timely::dataflow::InputHandle;

use clickagg_dataflows::batches::{worker_of, LargeBatches};
use clickagg_dataflows::render::dedup::route_delivery;
use clickagg_dataflows::{Click, DeadLetter, PartitionProgress, SourceNote, Time};

use crate::source::tail::WorkerInput;
use crate::source::SourceOutput;

/// The worker's inputs: clicks and notes, each at the time the rules give.
///
/// The clicks go in containers of [`LargeBatches`]' size, sent whole to timely's input handle
/// rather than through differential's `InputSession`, which ships them 85 at a time. Each
/// container holds the clicks of one de-duplication worker ([`route_delivery`]), so that its
/// exchange forwards it as it is ([`exchange_routed`](clickagg_dataflows::batches::exchange_routed)).
pub(super) struct Inputs {
    pub(super) clicks: InputHandle<Time, LargeBatches<(Click, Time, isize)>>,
    /// The clicks not yet sent, in containers by the worker they are for.
    routed: Vec<LargeBatches<(Click, Time, isize)>>,
    pub(super) notes: InputSession<Time, SourceNote, isize>,
}

impl SourceOutput for Inputs {
    fn click(&mut self, click: Click, time: Time) {
        assert!(time >= *self.clicks.time(), "a click before the input's time");
        let peers = self.routed.len();
        let builder = &mut self.routed[worker_of(route_delivery(&click), peers)];
        builder.push_into((click, time, 1));
        while let Some(container) = builder.extract() {
            self.clicks.send_batch(container);
        }
    }
    fn dead_letter(&mut self, dead: DeadLetter, time: Time) {
        self.notes.update_at(SourceNote::Dead(dead), time, 1);
    }
}

impl WorkerInput for Inputs {
    fn time(&self) -> Time {
        *self.clicks.time()
    }
    fn progress(&mut self, progress: PartitionProgress) {
        let now = *self.notes.time();
        self.notes.update_at(SourceNote::Progress(progress), now, 1);
    }
}

impl Inputs {
    pub(super) fn new(clicks: InputHandle<Time, LargeBatches<(Click, Time, isize)>>, notes: InputSession<Time, SourceNote, isize>, peers: usize) -> Self {
        Inputs { clicks, routed: (0..peers).map(|_| LargeBatches::default()).collect(), notes }
    }

    pub(super) fn advance_to(&mut self, time: Time) {
        // Sent at the time they were read at, before it moves on.
        self.send_routed();
        if time > *self.clicks.time() {
            self.clicks.advance_to(time);
            self.notes.advance_to(time);
        }
        self.clicks.flush();
        self.notes.flush();
    }

    fn send_routed(&mut self) {
        for builder in &mut self.routed {
            while let Some(container) = builder.finish() {
                self.clicks.send_batch(container);
            }
        }
    }
}

impl Drop for Inputs {
    /// Whatever ends the input, no click read is left unsent; unless a panic is unwinding, when
    /// the run is lost anyway and a second panic would abort the process before it can say why.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.send_routed();
        }
    }
}
