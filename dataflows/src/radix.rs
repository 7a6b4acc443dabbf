//! Consolidation of updates keyed by machine words, sorted by their bytes instead of by
//! comparisons.
//!
//! Every worker sorts each completed time's answers before they go to the sink (see
//! [`consolidate_completed_times`](crate::render::counts::consolidate_completed_times)): a
//! replay's times hold a hundred thousand answers each, and a comparison sort took about twenty
//! rounds of compares over them. The answers of one time differ in few of their bytes (a handful
//! of views and minutes, ids of a few bytes, small counts), so a stable counting pass per byte
//! that differs anywhere, least significant first, sorts them in about eight passes.

/// Sorts `updates` by their words (lexicographically, as `[u64; N]` compares), sums the diffs of
/// equal words, and drops those that sum to zero: what differential's `consolidate` does, with
/// the same result. `scratch` is room to work in, kept between calls.
pub fn consolidate_words<const N: usize>(updates: &mut Vec<([u64; N], isize)>, scratch: &mut Vec<([u64; N], isize)>) {
    if updates.len() < SMALL {
        updates.sort_unstable_by_key(|(words, _)| *words);
    } else {
        radix_sort(updates, scratch);
    }
    let mut kept = 0;
    for at in 0..updates.len() {
        if kept > 0 && updates[kept - 1].0 == updates[at].0 {
            updates[kept - 1].1 += updates[at].1;
        } else {
            updates[kept] = updates[at];
            kept += 1;
        }
    }
    updates.truncate(kept);
    updates.retain(|(_, diff)| *diff != 0);
}

/// Below this many updates a comparison sort is as quick as the counting passes' fixed cost.
const SMALL: usize = 256;

/// A stable least-significant-byte-first radix sort of `updates` by their words, over only the
/// bytes in which some two of them differ.
fn radix_sort<const N: usize>(updates: &mut Vec<([u64; N], isize)>, scratch: &mut Vec<([u64; N], isize)>) {
    let Some(&(first, _)) = updates.first() else { return };
    let mut differ = [0u64; N];
    for (words, _) in updates.iter() {
        for (bits, (word, was)) in differ.iter_mut().zip(words.iter().zip(first.iter())) {
            *bits |= word ^ was;
        }
    }
    scratch.clear();
    scratch.extend_from_slice(updates);
    let (mut from, mut to) = (&mut *updates, &mut *scratch);
    let mut passes = 0;
    for word in (0..N).rev() {
        for shift in (0..64).step_by(8) {
            if (differ[word] >> shift) & 0xFF == 0 {
                continue;
            }
            let byte = |words: &[u64; N]| ((words[word] >> shift) & 0xFF) as usize;
            let mut next = [0usize; 256];
            for (words, _) in from.iter() {
                next[byte(words)] += 1;
            }
            let mut start = 0;
            for slot in next.iter_mut() {
                let count = *slot;
                *slot = start;
                start += count;
            }
            for update in from.iter() {
                let at = &mut next[byte(&update.0)];
                to[*at] = *update;
                *at += 1;
            }
            std::mem::swap(&mut from, &mut to);
            passes += 1;
        }
    }
    // After an odd number of passes the sorted updates are in the scratch room.
    if passes % 2 == 1 {
        std::mem::swap(updates, scratch);
    }
}

#[cfg(test)]
mod tests {
    use super::consolidate_words;

    /// Updates whose words differ in a few bytes or in all of them, with equal words to sum and
    /// sums of zero, consolidate as differential's `consolidate` does; above and below the size
    /// at which the radix sort takes over.
    #[test]
    fn words_consolidate_as_differential_consolidates() {
        let mut next = crate::render::testing::generator(5);
        let mut scratch = Vec::new();
        for round in 0..300 {
            let len = [0, 1, 2, 100, 255, 256, 257, 2000, 5000][round % 9];
            // Which bytes of each word may differ: none, a few, or all.
            let masks: Vec<u64> = (0..3).map(|_| [0, 0xFF, 0xFF00_00FF, 0xFFFF_0000_0000_0000, u64::MAX][next(5) as usize]).collect();
            let base = [next(u64::MAX), next(u64::MAX), next(u64::MAX)];
            let distinct = 1 + next(len as u64 + 1);
            let pool: Vec<[u64; 3]> = (0..distinct).map(|_| [0, 1, 2].map(|i| base[i] ^ (next(u64::MAX) & masks[i]))).collect();
            let updates: Vec<([u64; 3], isize)> =
                (0..len).map(|_| (pool[next(distinct) as usize], next(5) as isize - 2)).collect();
            let mut ours = updates.clone();
            consolidate_words(&mut ours, &mut scratch);
            let mut theirs = updates;
            differential_dataflow::consolidation::consolidate(&mut theirs);
            assert_eq!(ours, theirs, "round {round}, {len} updates, masks {masks:x?}");
        }
    }
}
