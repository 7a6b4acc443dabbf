//! Hash maps for the operators that keep their state in hash maps instead of arrangements.
//!
//! Their keys are small integers and tuples of them, hashed millions of times a second, and never
//! chosen by an attacker in a way that matters (a skewed table costs time, not correctness; ids
//! come from our own ad servers' logs). SipHash, the standard library's default, spends most of a
//! lookup hashing them; this is the multiply-rotate hash rustc uses for its own tables.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};

/// A map with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

/// Folds each word in with a multiply (as `rustc-hash` does); the final rotation brings the
/// multiply's well-mixed high bits down to where a table takes its bucket index from.
#[derive(Clone, Copy, Default)]
pub struct FastHasher(u64);

const SEED: u64 = 0xf135_7aea_2e62_a9c5;

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0.rotate_left(26)
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.write_u64(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        let mut last = [0u8; 8];
        let rest = chunks.remainder();
        last[..rest.len()].copy_from_slice(rest);
        self.write_u64(u64::from_le_bytes(last) ^ (rest.len() as u64) << 59);
    }
    fn write_u8(&mut self, word: u8) {
        self.write_u64(u64::from(word));
    }
    fn write_u16(&mut self, word: u16) {
        self.write_u64(u64::from(word));
    }
    fn write_u32(&mut self, word: u32) {
        self.write_u64(u64::from(word));
    }
    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }
    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0 ^ word).wrapping_mul(SEED).rotate_left(20);
    }
    fn write_u128(&mut self, word: u128) {
        self.write_u64(word as u64);
        self.write_u64((word >> 64) as u64);
    }
}

/// `key`'s [`FastHasher`] hash: what the hash-state operators route, look up and index by.
pub fn fast_hash<K: Hash + ?Sized>(key: &K) -> u64 {
    BuildHasherDefault::<FastHasher>::default().hash_one(key)
}

/// How far ahead of the entry it updates a caller of [`ProbeMap::prefetch`] asks for one: enough
/// updates to have several cache misses in flight, few enough that the lines are still cached
/// when their update comes (16 to 48 measured no better).
pub const PREFETCH_AHEAD: usize = 8;

/// Starts loading the cache lines that `slot` spans; a no-op off x86-64.
fn prefetch_slot<T>(slot: &T) {
    let start = slot as *const T as *const i8;
    #[cfg(target_arch = "x86_64")]
    for line in (0..size_of::<T>()).step_by(64) {
        // SAFETY: SSE is part of x86-64's baseline, and a prefetch never faults, whatever the
        // address (this one is inside the slot, or just past it).
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(start.wrapping_add(line)) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = start;
}

/// An open-addressing map (linear probing) whose callers can prefetch a key's slot ahead of
/// using it, for state that takes a cache miss on nearly every update: de-duplication touches
/// each click's slot once, at random, in a table far larger than the caches, and a `HashMap`
/// gives no way to start that load early. With the slot asked for a few updates ahead
/// ([`ProbeMap::prefetch`]), several misses are in flight at once instead of one at a time.
///
/// Entries live in the slots themselves (`None` is a free slot), so a lookup touches one place;
/// removal shifts the following entries back instead of leaving tombstones. Hashed with
/// [`FastHasher`]; at most three quarters full.
pub struct ProbeMap<K, V> {
    slots: Vec<Option<(K, V)>>,
    len: usize,
}

impl<K, V> Default for ProbeMap<K, V> {
    fn default() -> Self {
        ProbeMap { slots: Vec::new(), len: 0 }
    }
}

impl<K: Hash + Eq, V> ProbeMap<K, V> {
    fn ideal(&self, key: &K) -> usize {
        fast_hash(key) as usize & (self.slots.len() - 1)
    }

    /// Where `key` is, or the free slot where it would go.
    fn find(&self, key: &K) -> usize {
        let mask = self.slots.len() - 1;
        let mut at = self.ideal(key);
        while let Some((held, _)) = &self.slots[at] {
            if held == key {
                break;
            }
            at = (at + 1) & mask;
        }
        at
    }

    /// Starts loading the cache lines `key`'s lookup reads first. Only a hint: it changes nothing.
    pub fn prefetch(&self, key: &K) {
        if self.slots.is_empty() {
            return;
        }
        prefetch_slot(&self.slots[self.ideal(key)]);
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        if self.slots.is_empty() {
            return None;
        }
        self.slots[self.find(key)].as_ref().map(|(_, value)| value)
    }

    pub fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        if self.slots.is_empty() {
            return None;
        }
        let at = self.find(key);
        self.slots[at].as_mut().map(|(_, value)| value)
    }

    /// Every entry, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> + '_ {
        self.slots.iter().flatten().map(|(key, value)| (key, value))
    }

    /// `key`'s value, inserting `make()` first if it has none.
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        if 4 * (self.len + 1) > 3 * self.slots.len() {
            self.grow();
        }
        let at = self.find(&key);
        let slot = &mut self.slots[at];
        if slot.is_none() {
            self.len += 1;
        }
        &mut slot.get_or_insert_with(|| (key, make())).1
    }

    /// Removes `key`'s entry, if any, and moves later entries of its run back into the gap, so
    /// that every entry stays reachable from its ideal slot without crossing a free one.
    pub fn remove(&mut self, key: &K) -> Option<V> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut gap = self.find(key);
        let (_, value) = self.slots[gap].take()?;
        self.len -= 1;
        let mut next = (gap + 1) & mask;
        while let Some((held, _)) = &self.slots[next] {
            // The entry may fill the gap unless its ideal slot lies cyclically in (gap, next].
            let ideal = self.ideal(held);
            if (next.wrapping_sub(ideal) & mask) >= (next.wrapping_sub(gap) & mask) {
                self.slots[gap] = self.slots[next].take();
                gap = next;
            }
            next = (next + 1) & mask;
        }
        Some(value)
    }

    fn grow(&mut self) {
        let capacity = (2 * self.slots.len()).max(16);
        let old = std::mem::replace(&mut self.slots, std::iter::repeat_with(|| None).take(capacity).collect());
        for (key, value) in old.into_iter().flatten() {
            let at = self.find(&key);
            self.slots[at] = Some((key, value));
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// How many slots it has: the room that [`clear`](Self::clear) and
    /// [`drain`](Self::drain) walk, whatever `len` is.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes every entry, keeping the room.
    pub fn clear(&mut self) {
        if self.len > 0 {
            // A dropped drain empties the slots it did not yield.
            self.drain();
        }
    }

    /// Removes and yields every entry, keeping the room; entries not yet yielded when the
    /// iterator is dropped are removed too.
    pub fn drain(&mut self) -> Drain<'_, K, V> {
        self.len = 0;
        Drain { slots: self.slots.iter_mut() }
    }
}

/// See [`ProbeMap::drain`].
pub struct Drain<'a, K, V> {
    slots: std::slice::IterMut<'a, Option<(K, V)>>,
}

impl<K, V> Iterator for Drain<'_, K, V> {
    type Item = (K, V);
    fn next(&mut self) -> Option<(K, V)> {
        self.slots.by_ref().find_map(Option::take)
    }
}

impl<K, V> Drop for Drain<'_, K, V> {
    fn drop(&mut self) {
        self.slots.by_ref().for_each(|slot| *slot = None);
    }
}

/// An open-addressing index (linear probing) from keys to positions in a list its caller keeps:
/// for state with large entries that it looks up at random. Each slot holds 32 bits of the key's
/// hash and a position, 8 bytes, so the slots a lookup probes are a small table that the caches
/// hold, where slots holding the entries themselves would be several times larger. The entries
/// stay in the caller's list, in the order they were added: touched once when added, as the list
/// grows, and again only when the key is found.
///
/// The caller hashes its keys (`hash`, the same for equal keys) and says, through `is_it`, whether
/// the entry at a position is the key sought: equal tags do not mean equal keys. A slot's place is
/// taken from the high bits of its tag, so growing needs neither the entries nor their hashes.
/// Removal shifts later slots back, as [`ProbeMap`]'s does. At most three quarters full.
pub struct TagIndex {
    slots: Vec<Slot>,
    len: usize,
    /// `32 - log2(slots.len())`: a tag's high bits are its ideal slot.
    shift: u32,
}

#[derive(Clone, Copy)]
struct Slot {
    tag: u32,
    position: u32,
}

impl Slot {
    const FREE: Slot = Slot { tag: 0, position: u32::MAX };
    fn is_free(&self) -> bool {
        self.position == u32::MAX
    }
}

impl Default for TagIndex {
    fn default() -> Self {
        TagIndex { slots: Vec::new(), len: 0, shift: 32 }
    }
}

impl TagIndex {
    /// The tag of a hash: the high bits of a multiply, so that any well-spread bits of `hash`
    /// spread over the tag, and over the ideal slot, which is the tag's high bits.
    fn tag_of(hash: u64) -> u32 {
        (hash.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32
    }

    fn ideal(&self, tag: u32) -> usize {
        // A shift of 32 (no slots) is never used: every caller checks for slots first.
        (tag >> self.shift) as usize
    }

    /// Starts loading the slot a lookup of `hash` reads first. Only a hint: it changes nothing.
    pub fn prefetch(&self, hash: u64) {
        if self.slots.is_empty() {
            return;
        }
        prefetch_slot(&self.slots[self.ideal(Self::tag_of(hash))]);
    }

    /// The position of the key hashed to `hash`, the one at which `is_it` holds; or, if none
    /// does, `None` after adding `position` for the key.
    pub fn find_or_add(&mut self, hash: u64, is_it: impl Fn(u32) -> bool, position: u32) -> Option<u32> {
        assert!(position != u32::MAX, "a position below u32::MAX");
        if 4 * (self.len + 1) > 3 * self.slots.len() {
            self.grow();
        }
        let tag = Self::tag_of(hash);
        let at = self.probe(tag, |held| is_it(held.position));
        if self.slots[at].is_free() {
            self.slots[at] = Slot { tag, position };
            self.len += 1;
            return None;
        }
        Some(self.slots[at].position)
    }

    /// The first slot from `tag`'s ideal one on that is free or holds `tag` and is `sought`.
    fn probe(&self, tag: u32, sought: impl Fn(Slot) -> bool) -> usize {
        let mask = self.slots.len() - 1;
        let mut at = self.ideal(tag);
        loop {
            let slot = self.slots[at];
            if slot.is_free() || (slot.tag == tag && sought(slot)) {
                return at;
            }
            at = (at + 1) & mask;
        }
    }

    /// Removes `position`, held for a key hashed to `hash`, and moves later slots of its run back
    /// into the gap, so that every slot stays reachable from its ideal one without crossing a
    /// free one. Nothing happens if it is not held.
    pub fn remove(&mut self, hash: u64, position: u32) {
        if self.slots.is_empty() {
            return;
        }
        let mut gap = self.probe(Self::tag_of(hash), |held| held.position == position);
        if self.slots[gap].is_free() {
            return;
        }
        let mask = self.slots.len() - 1;
        self.slots[gap] = Slot::FREE;
        self.len -= 1;
        let mut next = (gap + 1) & mask;
        while !self.slots[next].is_free() {
            // The slot may fill the gap unless its ideal slot lies cyclically in (gap, next].
            let ideal = self.ideal(self.slots[next].tag);
            if (next.wrapping_sub(ideal) & mask) >= (next.wrapping_sub(gap) & mask) {
                self.slots[gap] = std::mem::replace(&mut self.slots[next], Slot::FREE);
                gap = next;
            }
            next = (next + 1) & mask;
        }
    }

    fn grow(&mut self) {
        let capacity = (2 * self.slots.len()).max(16);
        let old = std::mem::replace(&mut self.slots, vec![Slot::FREE; capacity]);
        self.shift = 32 - capacity.trailing_zeros();
        let mask = capacity - 1;
        for slot in old.into_iter().filter(|slot| !slot.is_free()) {
            let mut at = self.ideal(slot.tag);
            while !self.slots[at].is_free() {
                at = (at + 1) & mask;
            }
            self.slots[at] = slot;
        }
    }

    /// How many positions it holds.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes every position, keeping the room.
    pub fn clear(&mut self) {
        if self.len > 0 {
            self.slots.fill(Slot::FREE);
            self.len = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::{FastMap, ProbeMap, TagIndex};

    /// Dense ids (ads numbered 0..n, minutes in a row) must spread over a table's buckets: the
    /// low bits, which pick the bucket, and the high seven, which the table compares first.
    #[test]
    fn dense_keys_spread_over_buckets() {
        let map: FastMap<(u32, u64), ()> = FastMap::default();
        let hasher = map.hasher();
        let mut low = vec![0u32; 1024];
        let mut high = vec![0u32; 128];
        for minute in 0..16u32 {
            for ad in 0..4096u64 {
                let hash = hasher.hash_one((minute, ad));
                low[(hash & 1023) as usize] += 1;
                high[(hash >> 57) as usize] += 1;
            }
        }
        // 65536 keys: 64 per low bucket and 512 per high tag on average.
        assert!(low.iter().all(|&n| (16..=160).contains(&n)), "{low:?}");
        assert!(high.iter().all(|&n| (256..=900).contains(&n)), "{high:?}");
    }

    /// Random inserts, updates, removals, clears and partial drains over a few keys (so that
    /// runs collide, wrap around the table's end and are shifted back by removals) leave a
    /// `ProbeMap` holding what a `HashMap` holds.
    #[test]
    fn probe_map_holds_what_a_hash_map_holds() {
        let mut next = crate::render::testing::generator(7);
        for round in 0..40 {
            let keys = 4 + next(60);
            let mut map: ProbeMap<(u64, u32), i64> = ProbeMap::default();
            let mut reference: std::collections::HashMap<(u64, u32), i64> = Default::default();
            for step in 0..4000 {
                let key = (next(keys), (next(3)) as u32);
                match next(100) {
                    0 => {
                        map.clear();
                        reference.clear();
                    }
                    1 => {
                        // A drain dropped part way removes everything as well.
                        let taken: Vec<_> = map.drain().take(next(4) as usize).collect();
                        for (key, value) in taken {
                            assert_eq!(reference.get(&key), Some(&value), "round {round}, step {step}");
                        }
                        reference.clear();
                    }
                    2..=40 => assert_eq!(map.remove(&key), reference.remove(&key), "round {round}, step {step}"),
                    _ => {
                        let add = next(5) as i64 - 1;
                        map.prefetch(&key);
                        *map.get_or_insert_with(key, || 0) += add;
                        *reference.entry(key).or_insert(0) += add;
                    }
                }
                assert_eq!(map.len(), reference.len(), "round {round}, step {step}");
                for (key, value) in &reference {
                    assert_eq!(map.get(key), Some(value), "round {round}, step {step}");
                }
                assert_eq!(map.get_mut(&key).map(|value| *value), reference.get(&key).copied(), "round {round}, step {step}");
                assert_eq!(map.iter().count(), reference.len(), "round {round}, step {step}");
            }
            let mut drained: Vec<_> = map.drain().collect();
            let mut expected: Vec<_> = reference.into_iter().collect();
            drained.sort();
            expected.sort();
            assert_eq!(drained, expected, "round {round}");
            assert!(map.is_empty());
        }
    }

    /// Random adds, lookups, removals and clears leave a `TagIndex` finding what a `HashMap`
    /// holds. Hashes are taken from a few values, so that different keys share tags, and only
    /// `is_it` tells them apart; the runs collide, wrap around and are shifted back by removals.
    #[test]
    fn tag_index_finds_what_a_hash_map_holds() {
        let mut next = crate::render::testing::generator(11);
        for round in 0..40 {
            let keys = 4 + next(80);
            let hashes = 1 + next(8);
            let hash = |key: u64| if round % 2 == 0 { key % hashes } else { key.wrapping_mul(0x2545_F491_4F6C_DD1D) };
            let mut index = TagIndex::default();
            // The caller's list: the key at each position, `None` once removed.
            let mut list: Vec<Option<u64>> = Vec::new();
            let mut reference: std::collections::HashMap<u64, u32> = Default::default();
            for step in 0..3000 {
                let key = next(keys);
                match next(100) {
                    0 => {
                        index.clear();
                        list.clear();
                        reference.clear();
                    }
                    1..=35 => match reference.remove(&key) {
                        Some(position) => {
                            index.remove(hash(key), position);
                            list[position as usize] = None;
                        }
                        // Not held: removing a position nobody holds changes nothing.
                        None => index.remove(hash(key), u32::MAX - 1),
                    },
                    _ => {
                        let position = list.len() as u32;
                        index.prefetch(hash(key));
                        match index.find_or_add(hash(key), |at| list[at as usize] == Some(key), position) {
                            Some(found) => assert_eq!(reference.get(&key), Some(&found), "round {round}, step {step}"),
                            None => {
                                assert_eq!(reference.insert(key, position), None, "round {round}, step {step}: added twice");
                                list.push(Some(key));
                            }
                        }
                    }
                }
                assert_eq!(index.len(), reference.len(), "round {round}, step {step}");
                for (&key, &position) in &reference {
                    let found = index.find_or_add(hash(key), |at| list[at as usize] == Some(key), u32::MAX - 1);
                    assert_eq!(found, Some(position), "round {round}, step {step}: key {key}");
                }
            }
        }
    }
}
