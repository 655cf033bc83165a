//! The simulator's event queue: events by (virtual time, order), earliest
//! first, ties by the `order` the caller gives.
//!
//! Why the caller orders ties, not the push: the simulator runs shards of
//! nodes on threads, and the order in which events reach a shard's queue
//! depends on when shards hand them over. An order the event carries (its
//! origin and that origin's count) makes every queue's sequence, and so the
//! run, the same whatever the shards are.
//!
//! Why not a `BinaryHeap` of the events themselves: with 100,000 simulated
//! nodes millions of messages are in flight, and every push and pop moves
//! heap entries along a path of the heap, a cache miss at each level. Here
//! the events sit still in a slab whose slots are reused (no move of a
//! message, no allocation per event), and their 16-byte keys are split by
//! time into buckets of `BUCKET` of virtual time, each a small heap: the
//! bucket being drained is small enough to stay in the cache.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::Duration;

/// Virtual time per bucket: messages take milliseconds, so the events in
/// flight spread over hundreds to thousands of buckets, and a bucket holds
/// a few hundred even with 100,000 nodes sending (at 100 µs a bucket held
/// thousands, and its heap's pops took a tenth of such a run).
const BUCKET: u64 = 10_000;

/// Emptied bucket heaps kept for reuse, at most.
const SPARE: usize = 64;

/// (time in nanoseconds << 64 | order, slot).
type Heap = BinaryHeap<Reverse<(u128, usize)>>;

#[derive(Debug)]
pub struct EventQueue<E> {
    /// By time / `BUCKET`; no bucket is empty.
    buckets: BTreeMap<u64, Heap>,
    spare: Vec<Heap>,
    slots: Vec<Option<E>>,
    free: Vec<usize>,
    len: usize,
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        EventQueue {
            buckets: BTreeMap::new(),
            spare: Vec::new(),
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<E> EventQueue<E> {
    /// Queues `event` at `at` (times past 584 years count as that); events
    /// at the same time come out by `order` (two events with the same time
    /// and order come out in no set order: the caller keeps them apart).
    pub fn push(&mut self, at: Duration, order: u64, event: E) {
        let nanos = u64::try_from(at.as_nanos()).unwrap_or(u64::MAX);
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s] = Some(event);
                s
            }
            None => {
                self.slots.push(Some(event));
                self.slots.len() - 1
            }
        };
        let key = (u128::from(nanos) << 64) | u128::from(order);
        let bucket = self.buckets.entry(nanos / BUCKET);
        bucket.or_insert_with(|| self.spare.pop().unwrap_or_default()).push(Reverse((key, slot)));
        self.len += 1;
    }

    /// The time of the earliest event.
    pub fn peek_time(&self) -> Option<Duration> {
        let (_, first) = self.buckets.first_key_value()?;
        first.peek().map(|Reverse((key, _))| Duration::from_nanos((key >> 64) as u64))
    }

    /// The earliest event and its time.
    pub fn pop(&mut self) -> Option<(Duration, E)> {
        self.pop_ordered().map(|(at, _, event)| (at, event))
    }

    /// The earliest event, its time and the order it was pushed with.
    pub fn pop_ordered(&mut self) -> Option<(Duration, u64, E)> {
        let mut first = self.buckets.first_entry()?;
        let Reverse((key, slot)) = first.get_mut().pop()?;
        if first.get().is_empty() {
            let heap = first.remove();
            if self.spare.len() < SPARE {
                self.spare.push(heap);
            }
        }
        self.len -= 1;
        let event = self.slots[slot].take()?;
        self.free.push(slot);
        Some((Duration::from_nanos((key >> 64) as u64), key as u64, event))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The queued events, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &E> {
        self.slots.iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_by_time_then_by_their_order() {
        let mut q = EventQueue::default();
        let ms = Duration::from_millis;
        for (t, order, e) in [(5, 1, 'a'), (1, 9, 'e'), (5, 2, 'c'), (3, 0, 'd'), (1, 3, 'b')] {
            q.push(ms(t), order, e);
        }
        assert_eq!(q.peek_time(), Some(ms(1)));
        let first: Vec<_> = (0..3).map(|_| q.pop().unwrap()).collect();
        assert_eq!(first, [(ms(1), 'b'), (ms(1), 'e'), (ms(3), 'd')]);
        // Freed slots are reused; order still holds.
        q.push(ms(4), 0, 'f');
        q.push(ms(5), 3, 'g');
        assert_eq!(q.len(), 4);
        let mut rest: Vec<char> = q.iter().copied().collect();
        rest.sort();
        assert_eq!(rest, ['a', 'c', 'f', 'g']);
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).map(|(_, e)| e).collect();
        assert_eq!(order, ['f', 'a', 'c', 'g']);
        assert!(q.is_empty() && q.pop().is_none() && q.peek_time().is_none());
        assert_eq!(q.slots.len(), 5, "no slot was added while one was free");
        q.push(ms(2), 7, 'h');
        assert_eq!(q.pop_ordered(), Some((ms(2), 7, 'h')));
    }

    #[test]
    fn times_beyond_the_key_saturate_and_sort_last() {
        let mut q = EventQueue::default();
        q.push(Duration::MAX, 0, 1);
        q.push(Duration::from_secs(1), 0, 2);
        assert_eq!(q.pop(), Some((Duration::from_secs(1), 2)));
        assert_eq!(q.pop(), Some((Duration::from_nanos(u64::MAX), 1)));
    }

    #[test]
    fn events_spread_over_many_buckets_come_out_as_a_sorted_set_would_give_them() {
        let mut q = EventQueue::default();
        // The model: (time, order), earliest first.
        let mut model = std::collections::BTreeSet::new();
        // A fixed pseudo-random walk of pushes and pops over 0..50 ms, with
        // ties, across hundreds of buckets.
        let mut x: u64 = 12345;
        for i in 0..20_000u32 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let at = Duration::from_micros((x >> 33) % 50_000 / 7 * 7);
            q.push(at, u64::from(i), i);
            model.insert((at, i));
            if x.is_multiple_of(3) {
                assert_eq!(q.pop(), model.pop_first());
            }
            assert_eq!(q.len(), model.len());
        }
        while let Some(next) = model.pop_first() {
            assert_eq!(q.peek_time(), Some(next.0));
            assert_eq!(q.pop(), Some(next));
        }
        assert!(q.is_empty() && q.buckets.is_empty());
    }
}
