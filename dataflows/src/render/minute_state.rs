//! Keyed state per minute, in hash maps, forgotten when the minute is final.
//!
//! An arrangement forgets a minute only when every update of it is retracted: a retraction per
//! click, sorted, merged and compacted like the click itself was. State that belongs to one minute
//! can do better: it is dropped whole once the minute is final, and what it contributed is
//! retracted from the output then, once per key. [`per_minute`] runs such state — de-duplication
//! and the per-minute counts — applying each time's updates in time order once the frontier has
//! passed it, as differential's operators do.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use differential_dataflow::collection::AsCollection;
use differential_dataflow::logging::{BatchEvent, DifferentialEventBuilder, DropEvent, Logger, MergeEvent};
use differential_dataflow::{ExchangeData, VecCollection};
use timely::dataflow::channels::pact::ParallelizationContract;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::Capability;

use super::peekable::{register, FirstRows, Peekable};
use crate::batches::LargeBatches;
use crate::event_time::EventTimeRules;
use crate::hashing::{FastMap, PREFETCH_AHEAD};
use crate::types::{Minute, Time};

/// The state one minute keeps, for one worker's share of the keys.
pub trait MinuteState: 'static {
    /// What arrives: one record, with a multiplicity.
    type Update: ExchangeData;
    /// What leaves.
    type Output: Clone + 'static;

    /// A hint that `update` is applied soon, for state that can start loading what it will
    /// touch (see [`ProbeMap::prefetch`](crate::hashing::ProbeMap::prefetch)). It changes nothing.
    fn prefetch(&self, _update: &Self::Update) {}
    /// Applies one update of the time being processed; `emit` sends output changes at that time.
    fn apply(&mut self, update: Self::Update, diff: isize, emit: &mut impl FnMut(Self::Output, isize));
    /// Called once a time's updates are all applied, for the state to send changes it nets per time.
    fn settle(&mut self, emit: &mut impl FnMut(Self::Output, isize));
    /// The minute is final: retracts everything the state has sent and not retracted, and leaves
    /// the state empty, for a later minute to reuse with its room.
    fn retire(&mut self, emit: &mut impl FnMut(Self::Output, isize));
    /// How many keys it holds.
    fn keys(&self) -> usize;
    /// Offers every key it holds of `minute`, with its value, to a peek (introspection). It may
    /// skip keys that cannot begin with the peek's prefix.
    fn peek(&self, minute: Minute, rows: &mut FirstRows);
    /// Events the state counted since it was last asked (de-duplication: deliveries of a click it
    /// already held), taken once a time's updates are applied and reported at that time by
    /// [`per_minute_tallied`]. None by default.
    fn take_tally(&mut self) -> isize {
        0
    }
}

/// A `per_minute` operator's live minutes, shared with the peeks of its worker.
type Minutes<S> = Rc<RefCell<FastMap<Minute, Live<S>>>>;

struct PeekMinutes<S>(Minutes<S>);

impl<S: MinuteState> Peekable for PeekMinutes<S> {
    fn peek(&self, rows: &mut FirstRows) -> Result<(), String> {
        for (&minute, live) in self.0.borrow().iter() {
            live.state.peek(minute, rows);
        }
        Ok(())
    }
}

/// Runs a [`MinuteState`] per minute (`minute_of` each update), each worker holding the keys
/// that `pact` brings it; `empty()` is a minute's state before its first update. The pact must
/// bring every update of a key to one worker: an exchange by a route computed from the key, or
/// a pipeline for input that is already partitioned that way (a [`ByAd`](crate::render::partition::ByAd)
/// for per-ad state).
///
/// Updates are applied in time order, each time once the input frontier has passed it. With a
/// lateness bound, a minute's state is retired at `rules.minute_final_at(minute)`, before that
/// time's updates are applied, and updates of a minute at or after that time are ignored: they
/// can only be retention retractions, and the retirement has already taken everything out. Without
/// one, minutes are never final, and their state is dropped without retractions once the input
/// ends.
///
/// The state is reported through differential's arrangement log (one batch per live minute, its
/// length the keys held), so introspection lists it beside the arrangements, under `name`; and
/// it can be peeked at under that name ([`super::peekable`]).
///
/// The pact's route and `minute_of` must be pure functions, so that every worker count gives the
/// same output.
pub fn per_minute<'scope, S: MinuteState, P>(
    name: &str,
    input: VecCollection<'scope, Time, S::Update>,
    pact: P,
    minute_of: impl Fn(&S::Update) -> Minute + 'static,
    rules: &EventTimeRules,
    empty: impl Fn() -> S + 'static,
) -> VecCollection<'scope, Time, S::Output>
where
    P: ParallelizationContract<Time, Vec<(S::Update, Time, isize)>>,
{
    per_minute_tallied(name, input, pact, minute_of, rules, empty).0
}

/// [`per_minute`], and the states' tallies ([`MinuteState::take_tally`]): a record `()` at each
/// time whose updates made a tally, with the tally as its multiplicity. A tally is taken after
/// all of a time's updates are applied, so it is a function of the updates up to that time, and
/// the same for any worker count when the state's is (a sum over keys, each key on one worker).
pub fn per_minute_tallied<'scope, S: MinuteState, P>(
    name: &str,
    input: VecCollection<'scope, Time, S::Update>,
    pact: P,
    minute_of: impl Fn(&S::Update) -> Minute + 'static,
    rules: &EventTimeRules,
    empty: impl Fn() -> S + 'static,
) -> (VecCollection<'scope, Time, S::Output>, VecCollection<'scope, Time, ()>)
where
    P: ParallelizationContract<Time, Vec<(S::Update, Time, isize)>>,
{
    let rules = *rules;
    let logger = StateLog::logger(&input.scope());
    let peek_name = name.to_string();
    let mut builder = OperatorBuilder::new(name.to_owned(), input.scope());
    let log = StateLog { logger, operator: builder.operator_info().global_id };
    let mut input = builder.new_input(input.inner, pact);
    let (output, stream) = builder.new_output();
    let mut output = OutputBuilder::<_, LargeBatches<(S::Output, Time, isize)>>::from(output);
    let (tallies, tally_stream) = builder.new_output();
    let mut tallies = OutputBuilder::<_, CapacityContainerBuilder<Vec<((), Time, isize)>>>::from(tallies);
    builder.build(move |_initial_capabilities| {
        {
            // Updates by time, applied in time order once the frontier has passed their time.
            let mut pending: BTreeMap<Time, HeldTime<S::Update>> = BTreeMap::new();
            let shared: Minutes<S> = Rc::new(RefCell::new(FastMap::default()));
            register(&peek_name, Rc::new(PeekMinutes(Rc::clone(&shared))));
            // When each live minute becomes final: at most one per time, as final times grow with
            // minutes.
            let mut finals: BTreeMap<Time, Minute> = BTreeMap::new();
            // A new minute takes over the state of the last retired one, emptied but with its room:
            // growing from empty rehashes every key about once more, and fresh memory is zeroed by
            // the kernel on first touch. The same goes for the lists of a time's updates.
            let mut spare_state: Option<S> = None;
            let mut spare_lists: Vec<Vec<(S::Update, isize)>> = Vec::new();
            let mut touched: Vec<Minute> = Vec::new();
            move |frontiers| {
                let frontier = &frontiers[0];
                let mut output = output.activate();
                let mut tallies = tallies.activate();
                let mut minutes = shared.borrow_mut();
                input.for_each(|capability, data| {
                    let mut data = data.drain(..).peekable();
                    while let Some((update, time, diff)) = data.next() {
                        let (_, _, updates) = pending.entry(time).or_insert_with(|| {
                            (capability.delayed(&time, 0), capability.delayed(&time, 1), spare_lists.pop().unwrap_or_default())
                        });
                        updates.push((update, diff));
                        // A container's updates mostly share one time: the rest of its run go
                        // to the same list without looking the time up again.
                        while let Some((update, _, diff)) = data.next_if(|(_, next, _)| *next == time) {
                            updates.push((update, diff));
                        }
                    }
                });
                let complete = |time: &Time| frontier.frontier().first().is_none_or(|f| f > time);
                loop {
                    let next_input = pending.first_key_value().map(|(&t, _)| t).filter(complete);
                    let next_final = finals.first_key_value().map(|(&t, _)| t).filter(complete);
                    match (next_input, next_final) {
                        // A minute final at `t` takes no updates at `t`: retire it first.
                        (_, Some(at)) if next_input.is_none_or(|t| at <= t) => {
                            let (_, minute) = finals.pop_first().expect("just seen");
                            let mut live = minutes.remove(&minute).expect("a final time for a live minute");
                            let capability = live.final_at.expect("a final time, so a capability for it");
                            let mut session = output.session_with_builder(&capability);
                            live.state.retire(&mut |out, diff| session.give((out, at, diff)));
                            log.dropped(live.reported);
                            spare_state = Some(live.state);
                        }
                        (Some(_), _) => {
                            let (_, (capability, tally_capability, mut updates)) = pending.pop_first().expect("just seen");
                            let time = *capability.time();
                            let mut session = output.session_with_builder(&capability);
                            let mut emit = |out, diff| session.give((out, time, diff));
                            let mut drain = updates.drain(..);
                            while let Some((update, diff)) = drain.next() {
                                // A time's updates come in runs of one minute: a run looks its
                                // minute's state up once.
                                let minute = minute_of(&update);
                                let run = 1 + drain.as_slice().iter().take_while(|(u, _)| minute_of(u) == minute).count();
                                let final_at = rules.minute_final_at(minute);
                                if final_at.is_some_and(|at| at <= time) {
                                    drain.by_ref().take(run - 1).for_each(drop);
                                    continue;
                                }
                                let live = minutes.entry(minute).or_insert_with(|| {
                                    if let Some(at) = final_at {
                                        finals.insert(at, minute);
                                    }
                                    log.created();
                                    Live {
                                        final_at: final_at.map(|at| capability.delayed(&at)),
                                        state: spare_state.take().unwrap_or_else(&empty),
                                        reported: 0,
                                    }
                                });
                                if !touched.contains(&minute) {
                                    touched.push(minute);
                                }
                                live.state.apply(update, diff, &mut emit);
                                for _ in 1..run {
                                    let (update, diff) = drain.next().expect("counted in the run");
                                    if let Some((ahead, _)) = drain.as_slice().get(PREFETCH_AHEAD) {
                                        if minute_of(ahead) == minute {
                                            live.state.prefetch(ahead);
                                        }
                                    }
                                    live.state.apply(update, diff, &mut emit);
                                }
                            }
                            drop(drain);
                            spare_lists.push(updates);
                            let mut tally = 0;
                            for minute in touched.drain(..) {
                                let live = minutes.get_mut(&minute).expect("touched, so live");
                                live.state.settle(&mut emit);
                                tally += live.state.take_tally();
                                log.resized(live.reported, live.state.keys());
                                live.reported = live.state.keys();
                            }
                            if tally != 0 {
                                tallies.session_with_builder(&tally_capability).give(((), time, tally));
                            }
                        }
                        (None, _) => break,
                    }
                }
                // Once the input is complete nothing changes any more: minutes that are never
                // final (no lateness bound) are forgotten too.
                if frontier.frontier().is_empty() {
                    for (_, live) in minutes.drain() {
                        log.dropped(live.reported);
                    }
                }
            }
        }
    });
    (stream.as_collection(), tally_stream.as_collection())
}

/// A time's capabilities (for the output and for the tallies) and the updates received for it,
/// with their multiplicities.
type HeldTime<U> = (Capability<Time>, Capability<Time>, Vec<(U, isize)>);

/// One live minute: its state, and the capability to retract it when the minute is final.
struct Live<S> {
    /// `None` without a lateness bound: the minute is never final, and no capability is held.
    final_at: Option<Capability<Time>>,
    state: S,
    /// How many keys the arrangement log was last told of.
    reported: usize,
}

/// Reports hash state as batches of an arrangement (one per live minute here), whose lengths are
/// the keys held, so that introspection lists it beside the arrangements: the events balance as
/// the spine's do (introspection adds a batch per `Batch`, removes one per completed `Merge` and
/// per `Drop`).
pub(crate) struct StateLog {
    pub(crate) logger: Option<Logger>,
    pub(crate) operator: usize,
}

impl StateLog {
    /// The worker's arrangement logger, if logging is on.
    pub(crate) fn logger(scope: &timely::dataflow::Scope<'_, Time>) -> Option<Logger> {
        scope.worker().logger_for::<DifferentialEventBuilder>("differential/arrange").map(Into::into)
    }
    pub(crate) fn created(&self) {
        if let Some(logger) = &self.logger {
            logger.log(BatchEvent { operator: self.operator, length: 0 });
        }
    }
    /// An empty batch merged into the minute's, leaving it `to` long.
    pub(crate) fn resized(&self, from: usize, to: usize) {
        if let (Some(logger), true) = (&self.logger, from != to) {
            logger.log(BatchEvent { operator: self.operator, length: 0 });
            logger.log(MergeEvent { operator: self.operator, scale: 0, length1: from, length2: 0, complete: Some(to) });
        }
    }
    pub(crate) fn dropped(&self, length: usize) {
        if let Some(logger) = &self.logger {
            logger.log(DropEvent { operator: self.operator, length });
        }
    }
}
