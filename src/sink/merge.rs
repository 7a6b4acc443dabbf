//! Merging the workers' sorted runs of one time's answers.

use clickagg_dataflows::Answer;

/// A time's runs of answers, each sorted and consolidated as the workers send them, read as
/// one: in order, each answer once, with its diffs summed and none that sum to zero. Two runs
/// (one per worker, with two) are merged as they are read; one is read as it is; more are
/// sorted together.
pub(super) struct MergedRuns {
    first: Vec<(Answer, isize)>,
    second: Vec<(Answer, isize)>,
    /// How much of each run has been read.
    read: (usize, usize),
}

impl MergedRuns {
    pub(super) fn of(mut runs: Vec<Vec<(Answer, isize)>>) -> MergedRuns {
        let (first, second) = match runs.len() {
            0 | 1 => (runs.pop().unwrap_or_default(), Vec::new()),
            2 => {
                let second = runs.pop().expect("two runs");
                (runs.pop().expect("two runs"), second)
            }
            _ => {
                let mut all = runs.concat();
                differential_dataflow::consolidation::consolidate(&mut all);
                (all, Vec::new())
            }
        };
        MergedRuns { first, second, read: (0, 0) }
    }
}

impl Iterator for MergedRuns {
    type Item = (Answer, isize);

    fn next(&mut self) -> Option<(Answer, isize)> {
        loop {
            let (i, j) = self.read;
            let (a, b) = match (self.first.get(i), self.second.get(j)) {
                (Some(&a), Some(&b)) => (a, b),
                (Some(&a), None) => {
                    self.read.0 += 1;
                    return Some(a);
                }
                (None, Some(&b)) => {
                    self.read.1 += 1;
                    return Some(b);
                }
                (None, None) => return None,
            };
            match a.0.cmp(&b.0) {
                std::cmp::Ordering::Less => {
                    self.read.0 += 1;
                    return Some(a);
                }
                std::cmp::Ordering::Greater => {
                    self.read.1 += 1;
                    return Some(b);
                }
                std::cmp::Ordering::Equal => {
                    self.read = (i + 1, j + 1);
                    if a.1 + b.1 != 0 {
                        return Some((a.0, a.1 + b.1));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs as workers send them: sorted, consolidated, no zero diffs. Few distinct answers, so
    /// that runs share some, and diffs of both signs, so that some cancel when merged.
    fn runs() -> impl Strategy<Value = Vec<Vec<(Answer, isize)>>> {
        let update = (0u32..3, 0u64..6, 1u64..3, -2isize..3).prop_map(|(minute, ad, clicks, diff)| {
            let answer = if ad % 2 == 0 { Answer::AdMinute { minute, ad, clicks } } else { Answer::TopMinute { minute, ad, clicks } };
            (answer, diff)
        });
        let run = prop::collection::vec(update, 0..12).prop_map(|mut run| {
            differential_dataflow::consolidation::consolidate(&mut run);
            run
        });
        prop::collection::vec(run, 0..5)
    }

    proptest! {
        /// However many runs, reading them merged gives what sorting them together gives.
        #[test]
        fn merged_runs_are_the_runs_consolidated(runs in runs()) {
            let mut expected = runs.concat();
            differential_dataflow::consolidation::consolidate(&mut expected);
            let merged: Vec<(Answer, isize)> = MergedRuns::of(runs).collect();
            prop_assert_eq!(merged, expected);
        }
    }
}
