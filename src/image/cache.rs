//! An LRU cache of cluster-sized metadata tables (L2 tables, refcount blocks), keyed by
//! host offset. It does no I/O: the owner decides when and in which order dirty tables
//! are written, because the write order is part of the format's crash consistency.

use std::collections::{BTreeMap, HashMap};

struct Slot {
    data: Box<[u8]>,
    dirty: bool,
    tick: u64,
}

/// Tables by host offset, evicting the least recently used.
pub(crate) struct TableCache {
    slots: HashMap<u64, Slot>,
    by_age: BTreeMap<u64, u64>,
    tick: u64,
    capacity: usize,
}

impl TableCache {
    /// A cache holding at most `capacity` tables (at least 2).
    pub fn new(capacity: usize) -> TableCache {
        TableCache {
            slots: HashMap::new(),
            by_age: BTreeMap::new(),
            tick: 0,
            capacity: capacity.max(2),
        }
    }

    fn touch(&mut self, key: u64) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(slot) = self.slots.get_mut(&key) {
            self.by_age.remove(&slot.tick);
            slot.tick = tick;
            self.by_age.insert(tick, key);
        }
    }

    /// True when the table at `key` is cached.
    pub fn contains(&self, key: u64) -> bool {
        self.slots.contains_key(&key)
    }

    /// The cached table at `key`.
    pub fn get(&mut self, key: u64) -> Option<&[u8]> {
        self.touch(key);
        self.slots.get(&key).map(|s| &*s.data)
    }

    /// The cached table at `key`, marked dirty.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut [u8]> {
        self.touch(key);
        self.slots.get_mut(&key).map(|s| {
            s.dirty = true;
            &mut *s.data
        })
    }

    /// The table that would be evicted next, with its dirtiness, if the cache is full.
    pub fn victim(&self) -> Option<(u64, bool)> {
        if self.slots.len() < self.capacity {
            return None;
        }
        let (_, &key) = self.by_age.iter().next()?;
        Some((key, self.slots[&key].dirty))
    }

    /// Inserts (or replaces) a table. The caller must have made room (see [`Self::victim`]).
    pub fn insert(&mut self, key: u64, data: Box<[u8]>, dirty: bool) {
        self.remove(key);
        self.tick += 1;
        self.by_age.insert(self.tick, key);
        self.slots.insert(
            key,
            Slot {
                data,
                dirty,
                tick: self.tick,
            },
        );
    }

    /// Drops a table without writing it.
    pub fn remove(&mut self, key: u64) {
        if let Some(slot) = self.slots.remove(&key) {
            self.by_age.remove(&slot.tick);
        }
    }

    /// Offsets of all dirty tables, ascending.
    pub fn dirty_keys(&self) -> Vec<u64> {
        let mut keys: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&k, _)| k)
            .collect();
        keys.sort_unstable();
        keys
    }

    /// The data of a table without touching its age (for writing it back).
    pub fn peek(&self, key: u64) -> Option<&[u8]> {
        self.slots.get(&key).map(|s| &*s.data)
    }

    /// Marks a table as written.
    pub fn mark_clean(&mut self, key: u64) {
        if let Some(s) = self.slots.get_mut(&key) {
            s.dirty = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
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
    }
}
