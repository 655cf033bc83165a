//! A map kept as one sorted `Vec` of pairs: for the handful of entries a
//! strategy keeps per neighbour or per slot.
//!
//! Why not a `BTreeMap`: its first entry allocates a whole leaf of eleven,
//! a separate block per map. A node's patience keyed by 80-byte peer ids
//! took 1.2 KB for a ring's two neighbours, a fifth of a simulated node's
//! memory. Here the entries sit in one block that keeps its capacity when
//! emptied, so a map that fills and empties every round (the inbox)
//! allocates once.
//! It grows by a quarter, not double: an exponential graph's node of
//! 100,000 has 34 neighbours, which doubling would keep in room for 64.
//! Lookups are a binary search and inserts move the entries after the
//! place: right for tens of entries, wrong for thousands.

use std::borrow::Borrow;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VecMap<K, V> {
    /// Sorted by key, no key twice.
    entries: Vec<(K, V)>,
}

impl<K, V> Default for VecMap<K, V> {
    fn default() -> Self {
        VecMap { entries: Vec::new() }
    }
}

impl<K: Ord, V> VecMap<K, V> {
    fn find<Q: Ord + ?Sized>(&self, key: &Q) -> Result<usize, usize>
    where
        K: Borrow<Q>,
    {
        self.entries.binary_search_by(|(k, _)| k.borrow().cmp(key))
    }

    pub fn get<Q: Ord + ?Sized>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| &self.entries[i].1)
    }

    pub fn get_mut<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| &mut self.entries[i].1)
    }

    pub fn contains_key<Q: Ord + ?Sized>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
    {
        self.find(key).is_ok()
    }

    /// Sets `key` to `value`; returns the value it replaced.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, value)),
            Err(i) => {
                self.insert_at(i, key, value);
                None
            }
        }
    }

    /// The value at `key`, made by `make` if there is none.
    pub fn get_or_insert_with(&mut self, key: K, make: impl FnOnce() -> V) -> &mut V {
        let i = match self.find(&key) {
            Ok(i) => i,
            Err(i) => {
                self.insert_at(i, key, make());
                i
            }
        };
        &mut self.entries[i].1
    }

    fn insert_at(&mut self, i: usize, key: K, value: V) {
        if self.entries.len() == self.entries.capacity() {
            self.entries.reserve_exact((self.entries.len() / 4).max(4));
        }
        self.entries.insert(i, (key, value));
    }

    pub fn remove<Q: Ord + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.find(key).ok().map(|i| self.entries.remove(i).1)
    }

    /// Forgets every entry whose key is below `key` (keeps the block).
    pub fn remove_below(&mut self, key: &K) {
        let at = self.entries.partition_point(|(k, _)| k < key);
        self.entries.drain(..at);
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool) {
        self.entries.retain(|(k, v)| keep(k, v));
    }

    /// The entries whose key is above `key`, in order.
    pub fn above<'a>(&'a self, key: &K) -> impl Iterator<Item = (&'a K, &'a V)> {
        let from = self.entries.partition_point(|(k, _)| k <= key);
        self.entries[from..].iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.entries.iter().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Every operation against a `BTreeMap` given the same pseudo-random
    /// walk of keys.
    #[test]
    fn it_answers_every_operation_as_a_btree_map_does() {
        let mut map = VecMap::default();
        let mut model = BTreeMap::new();
        let mut x: u64 = 7;
        for i in 0..5_000u32 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let key = (x >> 40) % 64;
            match (x >> 20) % 8 {
                0..=2 => assert_eq!(map.insert(key, i), model.insert(key, i)),
                3 => assert_eq!(map.remove(&key), model.remove(&key)),
                4 => {
                    *map.get_or_insert_with(key, || i) += 1;
                    *model.entry(key).or_insert(i) += 1;
                }
                5 => {
                    map.remove_below(&key);
                    model = model.split_off(&key);
                }
                6 => {
                    map.retain(|k, v| (k + u64::from(*v)) % 3 != 0);
                    model.retain(|k, v| (*k + u64::from(*v)) % 3 != 0);
                }
                _ => {
                    if let Some(v) = map.get_mut(&key) {
                        *v += 2;
                    }
                    if let Some(v) = model.get_mut(&key) {
                        *v += 2;
                    }
                }
            }
            assert_eq!(map.get(&key), model.get(&key));
            assert_eq!(map.contains_key(&key), model.contains_key(&key));
            let above: Vec<_> = map.above(&key).collect();
            let model_above: Vec<_> = model.range(key + 1..).collect();
            assert_eq!(above, model_above);
            assert_eq!(map.len(), model.len());
        }
        assert!(map.keys().eq(model.keys()) && map.values().eq(model.values()));
        assert_eq!(map.is_empty(), model.is_empty());
    }

    #[test]
    fn an_emptied_map_keeps_its_block() {
        let mut map = VecMap::default();
        for k in 0..3 {
            map.insert(k, ());
        }
        let block = map.entries.capacity();
        map.remove_below(&10);
        map.insert(5, ());
        assert!(map.len() == 1 && map.entries.capacity() == block);
        // Grown by a quarter: 34 entries in room for 38, not 64.
        for k in 0..34 {
            map.insert(k, ());
        }
        assert_eq!(map.entries.capacity(), 38);
    }
}
