//! Which worker of a cluster reads which partition file.
//!
//! Every partition has a cluster-wide id: its index in the sorted list of every partition name
//! in the cluster. The dead letters and the store name partitions through that list, so the
//! answers are the same bytes whichever worker of whichever process reads a partition.
//!
//! Two layouts of the log directories:
//! - **shared** (the default): every process sees the same directory (a shared filesystem), so
//!   every process lists the same names; worker `w` of the `W·N` reads ids `w, w + W·N, …`.
//! - **local** (`--local-logs`): each process reads only its own directory (an ad server's own
//!   disk); names must be unique across the cluster, and a partition is read by a worker of the
//!   process that has it, spread over that process's `W` workers in id order.
//!
//! The layout is declared, not guessed from the names: local directories whose files happen to
//! share names (two ad servers that both write `part-00000.csv`) look exactly like one shared
//! directory, and reading them as one would silently drop each process's other files.

use std::collections::BTreeMap;

/// How the processes of a cluster see the log directories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogsMode {
    /// Every process sees the same partition files.
    Shared,
    /// Each process reads the partition files of its own directory only.
    Local,
}

/// The partitions of the whole cluster and who reads each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub mode: LogsMode,
    /// Every partition name in the cluster, sorted: a partition's id is its index here.
    pub names: Vec<String>,
    /// The process that has each partition (local mode; in shared mode every process has all).
    owners: Vec<usize>,
}

/// At most this many partitions are named in an error; the count says how many more.
const NAMED_IN_ERRORS: usize = 8;

impl Layout {
    /// One process (or any layout of one): it reads every partition it lists.
    pub fn single(names: Vec<String>) -> Layout {
        Layout { mode: LogsMode::Shared, owners: vec![0; names.len()], names }
    }

    /// The layout every process agrees on, from each process's sorted partition names (in
    /// process order). Every process computes it from the same greetings, so all agree, or
    /// all refuse with the same message.
    ///
    /// Shared mode needs every process to list the same names. Local mode needs each name in
    /// one process only; the error names the duplicated partitions and the processes holding
    /// them.
    pub fn agree(mode: LogsMode, lists: &[Vec<String>]) -> Result<Layout, String> {
        let mut holders: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (process, list) in lists.iter().enumerate() {
            for name in list {
                holders.entry(name.as_str()).or_default().push(process);
            }
        }
        match mode {
            LogsMode::Shared => {
                let Some(first) = lists.first() else { return Ok(Layout::single(Vec::new())) };
                if lists.iter().all(|list| list == first) {
                    return Ok(Layout::single(first.clone()));
                }
                Err(shared_mismatch(lists, &holders))
            }
            LogsMode::Local => {
                let duplicated: Vec<(&str, &Vec<usize>)> =
                    holders.iter().filter(|(_, processes)| processes.len() > 1).map(|(name, p)| (*name, p)).collect();
                if !duplicated.is_empty() {
                    return Err(local_duplicates(lists, &duplicated));
                }
                let names: Vec<String> = holders.keys().map(|name| name.to_string()).collect();
                let owners = holders.values().map(|processes| processes[0]).collect();
                Ok(Layout { mode, names, owners })
            }
        }
    }

    /// The ids of the partitions worker `worker` reads, in id order. `worker` is the worker's
    /// index in the cluster, `process · workers + local index`, as timely numbers them.
    pub fn partitions_of(&self, worker: usize, workers: usize, processes: usize) -> Vec<usize> {
        match self.mode {
            LogsMode::Shared => (worker..self.names.len()).step_by(workers * processes).collect(),
            LogsMode::Local => {
                let (process, local) = (worker / workers, worker % workers);
                let own = (0..self.names.len()).filter(|&id| self.owners[id] == process);
                own.skip(local).step_by(workers).collect()
            }
        }
    }

    /// Whether worker `worker` reads a partition found after the start whose id is `id`
    /// (follow mode; see `run::discovered_partition_id`). In shared mode every process finds
    /// it and one worker of the cluster reads it; in local mode only the process that has it
    /// finds it, and one of its workers reads it.
    pub fn reads_discovered(&self, id: u32, worker: usize, workers: usize, processes: usize) -> bool {
        match self.mode {
            LogsMode::Shared => id as usize % (workers * processes) == worker,
            LogsMode::Local => id as usize % workers == worker % workers,
        }
    }
}

/// Up to [`NAMED_IN_ERRORS`] names, and how many more.
fn some_names<'a>(names: impl ExactSizeIterator<Item = &'a str>) -> String {
    let total = names.len();
    let mut text: Vec<&str> = names.take(NAMED_IN_ERRORS).collect();
    let more = total - text.len();
    let more = if more > 0 { format!(" and {more} more") } else { String::new() };
    text.sort_unstable();
    format!("{}{more}", text.join(", "))
}

/// Shared mode, lists that differ: which process lacks what, and the way to local mode when
/// the lists are disjoint.
fn shared_mismatch(lists: &[Vec<String>], holders: &BTreeMap<&str, Vec<usize>>) -> String {
    let counts: Vec<String> = lists.iter().enumerate().map(|(p, list)| format!("process {p} found {}", list.len())).collect();
    let mut lines = vec![format!(
        "the processes found different partition files in their --logs ({}): every process must see the same log directory",
        counts.join(", ")
    )];
    for (process, list) in lists.iter().enumerate() {
        let missing: Vec<&str> = holders.keys().copied().filter(|name| list.binary_search_by(|n| n.as_str().cmp(name)).is_err()).collect();
        if !missing.is_empty() {
            lines.push(format!("  process {process} lacks {}", some_names(missing.into_iter())));
        }
    }
    if holders.values().all(|processes| processes.len() == 1) {
        lines.push(
            "  no partition is on two processes: if each process has a directory of its own, start every process with --local-logs"
                .to_string(),
        );
    }
    lines.join("\n")
}

/// Local mode, names on more than one process.
fn local_duplicates(lists: &[Vec<String>], duplicated: &[(&str, &Vec<usize>)]) -> String {
    let mut lines = vec![format!(
        "with --local-logs every partition name must be unique across the cluster, but {} partition(s) are in the --logs of more than one process:",
        duplicated.len()
    )];
    for (name, processes) in duplicated.iter().take(NAMED_IN_ERRORS) {
        let processes: Vec<String> = processes.iter().map(|p| p.to_string()).collect();
        lines.push(format!("  {name} is on processes {}", processes.join(" and ")));
    }
    if duplicated.len() > NAMED_IN_ERRORS {
        lines.push(format!("  and {} more", duplicated.len() - NAMED_IN_ERRORS));
    }
    let all_alike = lists.windows(2).all(|pair| pair[0] == pair[1]);
    lines.push(if all_alike {
        "  every process lists the same files: if they share one directory, start them without --local-logs; \
         otherwise rename the files so that no two processes have the same name"
            .to_string()
    } else {
        "  rename the files so that no two processes have the same name (a shared directory needs every process to see all of it)".to_string()
    });
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(range: std::ops::Range<usize>) -> Vec<String> {
        range.map(|i| format!("part-{i:05}.csv")).collect()
    }

    #[test]
    fn shared_mode_reads_every_partition_once_as_before() {
        let layout = Layout::agree(LogsMode::Shared, &[names(0..7), names(0..7)]).unwrap();
        assert_eq!(layout.names, names(0..7));
        // 2 processes × 2 workers: worker w reads w, w + 4, … as a single list always did.
        let read: Vec<Vec<usize>> = (0..4).map(|w| layout.partitions_of(w, 2, 2)).collect();
        assert_eq!(read, [vec![0, 4], vec![1, 5], vec![2, 6], vec![3]]);
    }

    #[test]
    fn local_mode_reads_each_partition_on_the_process_that_has_it() {
        let a = vec!["part-00000.csv".to_string(), "part-00003.csv".into(), "part-00004.csv".into()];
        let b = vec!["part-00001.csv".to_string(), "part-00002.csv".into()];
        let layout = Layout::agree(LogsMode::Local, &[a, b]).unwrap();
        assert_eq!(layout.names, names(0..5));
        // Process 0's workers 0 and 1 split its ids 0, 3, 4; process 1's workers 2 and 3 split 1, 2.
        let read: Vec<Vec<usize>> = (0..4).map(|w| layout.partitions_of(w, 2, 2)).collect();
        assert_eq!(read, [vec![0, 4], vec![3], vec![1], vec![2]]);
        let one_worker: Vec<Vec<usize>> = (0..2).map(|w| layout.partitions_of(w, 1, 2)).collect();
        assert_eq!(one_worker, [vec![0, 3, 4], vec![1, 2]]);
        // A partition found later is read on the process that found it, by one of its workers.
        for id in [0x8000_0001u32, 0x8000_0002] {
            let readers: Vec<usize> = (0..2).filter(|&w| layout.reads_discovered(id, w, 2, 2)).collect();
            assert_eq!(readers.len(), 1, "one worker of process 0 reads {id:x}");
        }
    }

    #[test]
    fn overlapping_or_differing_lists_are_refused_by_name() {
        let error = Layout::agree(LogsMode::Local, &[names(0..4), names(3..8)]).unwrap_err();
        assert!(error.contains("part-00003.csv is on processes 0 and 1"), "{error}");
        assert!(!error.contains("part-00004.csv is on"), "{error}");
        let same = Layout::agree(LogsMode::Local, &[names(0..4), names(0..4)]).unwrap_err();
        assert!(same.contains("without --local-logs"), "{same}");

        let error = Layout::agree(LogsMode::Shared, &[names(0..4), names(3..8)]).unwrap_err();
        assert!(error.contains("same log directory") && error.contains("process 0 lacks part-00004.csv"), "{error}");
        assert!(!error.contains("--local-logs"), "overlapping sets are not local directories: {error}");
        let disjoint = Layout::agree(LogsMode::Shared, &[names(0..4), names(4..8)]).unwrap_err();
        assert!(disjoint.contains("start every process with --local-logs"), "{disjoint}");
        let many = Layout::agree(LogsMode::Local, &[names(0..20), names(0..20)]).unwrap_err();
        assert!(many.contains("and 12 more"), "{many}");
    }
}
