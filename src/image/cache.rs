//! A cache of cluster-sized metadata tables (L2 tables, refcount blocks), keyed by
//! host offset. It does no I/O: the owner decides when and in which order dirty tables
//! are written, because the write order is part of the format's crash consistency.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Hashes host offsets (cluster-aligned u64s) with one multiply: SipHash's DoS
/// resistance buys nothing for a map that holds at most `capacity` entries.
#[derive(Default)]
struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }

    fn write_u64(&mut self, n: u64) {
        // Offsets are multiples of 512 at least: drop those bits, then spread.
        let x = (n >> 9).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 32);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

struct Slot {
    key: u64,
    data: Box<[u8]>,
    dirty: bool,
    /// Used since the clock hand last passed (second chance).
    referenced: bool,
}

/// Tables by host offset, evicting with the clock algorithm (an approximation of
/// least recently used that costs a flag per access instead of reordering a list).
pub(crate) struct TableCache {
    slots: Vec<Slot>,
    index: HashMap<u64, usize, BuildHasherDefault<OffsetHasher>>,
    /// The slot of the last lookup: consecutive requests mostly hit the same table.
    last: Cell<usize>,
    hand: usize,
    capacity: usize,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 2).
    pub fn new(capacity: usize) -> TableCache {
        TableCache {
            slots: Vec::new(),
            index: HashMap::default(),
            last: Cell::new(usize::MAX),
            hand: 0,
            capacity: capacity.max(2),
        }
    }

    fn find(&self, key: u64) -> Option<usize> {
        let last = self.last.get();
        if self.slots.get(last).is_some_and(|s| s.key == key) {
            return Some(last);
        }
        let i = *self.index.get(&key)?;
        self.last.set(i);
        Some(i)
    }

    /// True when the table at `key` is cached.
    pub fn contains(&self, key: u64) -> bool {
        self.find(key).is_some()
    }

    /// The cached table at `key`.
    pub fn get(&mut self, key: u64) -> Option<&[u8]> {
        let i = self.find(key)?;
        let slot = &mut self.slots[i];
        slot.referenced = true;
        Some(&slot.data)
    }

    /// The cached table at `key`, marked dirty.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut [u8]> {
        let i = self.find(key)?;
        let slot = &mut self.slots[i];
        slot.referenced = true;
        slot.dirty = true;
        Some(&mut slot.data)
    }

    /// The table to evict next, with its dirtiness, if the cache is full (the clock
    /// hand gives every recently used table a second chance on its way).
    pub fn victim(&mut self) -> Option<(u64, bool)> {
        if self.slots.len() < self.capacity {
            return None;
        }
        loop {
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let slot = &mut self.slots[self.hand];
            if !slot.referenced {
                return Some((slot.key, slot.dirty));
            }
            slot.referenced = false;
            self.hand += 1;
        }
    }

    /// Inserts (or replaces) a table. The caller must have made room (see [`Self::victim`]).
    pub fn insert(&mut self, key: u64, data: Box<[u8]>, dirty: bool) {
        let slot = Slot {
            key,
            data,
            dirty,
            referenced: true,
        };
        match self.find(key) {
            Some(i) => self.slots[i] = slot,
            None => {
                self.index.insert(key, self.slots.len());
                self.slots.push(slot);
            }
        }
    }

    /// Drops a table without writing it.
    pub fn remove(&mut self, key: u64) {
        let Some(i) = self.find(key) else { return };
        self.index.remove(&key);
        self.slots.swap_remove(i);
        if let Some(moved) = self.slots.get(i) {
            self.index.insert(moved.key, i);
        }
        self.last.set(usize::MAX);
    }

    /// Offsets of all dirty tables, ascending.
    pub fn dirty_keys(&self) -> Vec<u64> {
        let mut keys: Vec<u64> = self
            .slots
            .iter()
            .filter(|s| s.dirty)
            .map(|s| s.key)
            .collect();
        keys.sort_unstable();
        keys
    }

    /// The data of a table without marking it used (for writing it back).
    pub fn peek(&self, key: u64) -> Option<&[u8]> {
        self.find(key).map(|i| &*self.slots[i].data)
    }

    /// Marks a table as written.
    pub fn mark_clean(&mut self, key: u64) {
        if let Some(i) = self.find(key) {
            self.slots[i].dirty = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_what_was_not_used_recently() {
        let mut c = TableCache::new(2);
        c.insert(1, vec![1].into(), false);
        c.insert(2, vec![2].into(), true);
        assert_eq!(c.victim(), Some((1, false)));
        c.get(1);
        assert_eq!(c.victim(), Some((2, true)));
        c.remove(2);
        assert_eq!(c.victim(), None);
        c.get_mut(1).unwrap()[0] = 9;
        assert_eq!(c.dirty_keys(), vec![1]);
        c.mark_clean(1);
        assert!(c.dirty_keys().is_empty());
        assert_eq!(c.peek(1), Some(&[9u8][..]));
        // Many tables, removed and replaced in any order: the index stays exact.
        let mut c = TableCache::new(8);
        for k in 1..=8u64 {
            c.insert(k << 16, vec![k as u8].into(), k % 2 == 0);
        }
        for k in [3u64, 8, 1] {
            c.remove(k << 16);
            assert!(!c.contains(k << 16));
        }
        for k in [2u64, 4, 5, 6, 7] {
            assert_eq!(c.peek(k << 16), Some(&[k as u8][..]));
        }
        assert_eq!(c.dirty_keys(), vec![2 << 16, 4 << 16, 6 << 16]);
        for k in 9..=11u64 {
            assert_eq!(c.victim(), None);
            c.insert(k << 16, vec![k as u8].into(), false);
        }
        let (v, _) = c.victim().unwrap();
        c.remove(v);
        assert!(!c.contains(v));
        assert_eq!(c.slots.len(), 7);
    }
}
