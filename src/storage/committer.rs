//! The committer: commits each watermark advance on threads of its own, chaining the stores.
//!
//! One thread and one queue per store keep the commits in order; each queue holds one advance,
//! so a store slower than the dataflow slows the dataflow down instead of filling memory. Each
//! queued batch is still one transaction. With a PostgreSQL mirror, the mirror's thread commits
//! each advance first and then hands it on to the SQLite store's thread: PostgreSQL takes
//! advance k+1 while SQLite takes advance k, and the mirror is never behind the store (see
//! [`postgres`](super::postgres)).

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Mutex;

use clickagg_dataflows::{PartitionProgress, Time};

use super::{Batch, CommitStore, RunStore};

/// Held while a transaction commits to the store: a clean shutdown takes it, so the process never
/// exits half-way through a commit (SQLite would roll that back anyway; this keeps the exit
/// message true).
pub static COMMIT_LOCK: Mutex<()> = Mutex::new(());

/// Held while the mirror commits, as `COMMIT_LOCK` is while the store does.
pub static MIRROR_LOCK: Mutex<()> = Mutex::new(());

/// How often a follower that reads lines but moves no watermark (duplicates, a caught-up log
/// whose last rows wait for the watermark) commits its offsets.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// One watermark advance on its way: its frontier (`None`: the end of the input) and its batch.
type Advance = (Option<Time>, Batch);

/// Commits on threads of their own, so that worker 0 computes the next watermark advance while
/// the stores write and sync this one.
pub struct Committer {
    queue: Option<SyncSender<Advance>>,
    thread: Option<std::thread::JoinHandle<Result<Box<dyn RunStore>, String>>>,
    mirror_thread: Option<std::thread::JoinHandle<Result<(), String>>>,
    /// The frontier of the last batch sent.
    sent: Option<Time>,
    /// When a batch was last sent, and the partitions' progress committed without answers.
    sent_at: std::time::Instant,
    progress_sent: BTreeMap<String, PartitionProgress>,
}

/// Told that every update before a frontier (`None`: the whole input) is committed.
pub type OnCommit = Box<dyn Fn(Option<Time>) + Send>;

impl Committer {
    /// Starts the commit threads: `mirror`'s first, when there is one, then `store`'s.
    /// `on_commit` is called on the commit thread after each of the store's commits, with its
    /// frontier (the server then drops the minutes that are final and committed).
    pub fn start(store: Box<dyn RunStore>, mirror: Option<Box<dyn CommitStore>>, on_commit: Option<OnCommit>) -> Committer {
        let sent = store.frontier();
        let (queue, batches) = std::sync::mpsc::sync_channel::<Advance>(1);
        let (store_batches, mirror_thread) = match mirror {
            None => (batches, None),
            Some(mirror) => {
                let (to_store, store_batches) = std::sync::mpsc::sync_channel::<Advance>(1);
                let thread = std::thread::Builder::new()
                    .name("clickagg:postgres".into())
                    .spawn(move || mirror_commits(mirror, batches, to_store))
                    .expect("spawning the PostgreSQL commit thread");
                (store_batches, Some(thread))
            }
        };
        let thread = std::thread::Builder::new()
            .name("clickagg:commit".into())
            .spawn(move || {
                let mut store = store;
                for (frontier, batch) in store_batches {
                    let committing = COMMIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
                    store.commit(frontier, &batch)?;
                    drop(committing);
                    if let Some(on_commit) = &on_commit {
                        on_commit(frontier);
                    }
                }
                Ok(store)
            })
            .expect("spawning the commit thread");
        Committer { queue: Some(queue), thread: Some(thread), mirror_thread, sent, sent_at: std::time::Instant::now(), progress_sent: BTreeMap::new() }
    }

    /// Hands `batch` to the commit thread with `frontier`, leaving `batch` empty (its partition
    /// names kept). A batch of progress alone, with no new frontier, waits for the next one:
    /// offsets without answers need no transaction of their own, except now and then
    /// (`PROGRESS_EVERY`), so that the offsets of lines that move nothing still get committed.
    pub fn commit(&mut self, frontier: Option<Time>, batch: &mut Batch) -> Result<(), String> {
        let advances = match (frontier, self.sent) {
            (None, _) | (_, None) => true,
            (Some(f), Some(sent)) => f > sent,
        };
        let has_answers =
            !(batch.changes.is_empty() && batch.serving.is_empty() && batch.snapshots.is_empty() && batch.dead_letters.is_empty());
        if !advances && !has_answers {
            let new_progress = batch.progress.iter().any(|(name, p)| self.progress_sent.get(name) != Some(p));
            if !new_progress || self.sent_at.elapsed() < PROGRESS_EVERY {
                return Ok(());
            }
        }
        self.sent_at = std::time::Instant::now();
        self.progress_sent.extend(batch.progress.iter().map(|(name, p)| (name.clone(), *p)));
        let names = batch.partition_names.clone();
        let full = std::mem::replace(batch, Batch { partition_names: names, ..Default::default() });
        self.sent = frontier.or(Some(Time::MAX)).max(self.sent);
        let queue = self.queue.as_ref().expect("the queue lives until finish");
        if queue.send((frontier, full)).is_err() {
            // The thread stopped on an error: that error is the one to report.
            return Err(self.join().err().unwrap_or_else(|| "the commit thread stopped".into()));
        }
        Ok(())
    }

    /// Waits for every queued commit and returns the store.
    pub fn finish(mut self) -> Result<Box<dyn RunStore>, String> {
        self.join()
    }

    fn join(&mut self) -> Result<Box<dyn RunStore>, String> {
        self.queue = None;
        // The mirror's error first: when it stops, the store's thread just sees its queue end.
        if let Some(mirror) = self.mirror_thread.take() {
            mirror.join().map_err(|_| "the PostgreSQL commit thread panicked".to_string())??;
        }
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| "the commit thread panicked".to_string())?,
            None => Err("the commit thread was already joined".into()),
        }
    }
}

/// Commits each batch to the mirror, then hands it to the store's thread.
fn mirror_commits(mut mirror: Box<dyn CommitStore>, batches: Receiver<Advance>, to_store: SyncSender<Advance>) -> Result<(), String> {
    let mut faults = fault::Injector::from_env();
    for (frontier, batch) in batches {
        {
            let _committing = MIRROR_LOCK.lock().unwrap_or_else(|e| e.into_inner());
            let committed = mirror.commit(frontier, &batch)?;
            faults.after_mirror_commit(committed);
        }
        if to_store.send((frontier, batch)).is_err() {
            // The store's thread stopped on an error, which `join` reports.
            break;
        }
    }
    Ok(())
}

/// Fault injection for the tests, built only with the `fault-injection` feature: die right after
/// the mirror's commit number `CLICKAGG_FAULT_CRASH_AFTER_MIRROR_COMMITS`, when the mirror is
/// ahead of the store.
#[cfg(feature = "fault-injection")]
mod fault {
    pub struct Injector {
        crash_after: Option<u64>,
        mirrored: u64,
    }

    impl Injector {
        pub fn from_env() -> Injector {
            let crash_after = std::env::var("CLICKAGG_FAULT_CRASH_AFTER_MIRROR_COMMITS").ok().and_then(|n| n.parse().ok());
            Injector { crash_after, mirrored: 0 }
        }

        /// Called with whether the mirror committed a transaction.
        pub fn after_mirror_commit(&mut self, committed: bool) {
            self.mirrored += u64::from(committed);
            if self.crash_after == Some(self.mirrored) {
                eprintln!("clickagg: fault injected: exiting between the PostgreSQL commit and the store's");
                std::process::abort();
            }
        }
    }
}

/// Without the `fault-injection` feature, nothing is injected: no environment is read, and
/// nothing here can end the process.
#[cfg(not(feature = "fault-injection"))]
mod fault {
    pub struct Injector;

    impl Injector {
        pub fn from_env() -> Injector {
            Injector
        }

        pub fn after_mirror_commit(&mut self, _committed: bool) {}
    }
}
