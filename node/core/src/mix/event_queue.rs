//! The simulator's event queue: events by (virtual time, sequence number),
//! earliest first, ties in the order they were pushed.
//!
//! Why not a `BinaryHeap` of the events themselves: with 100,000 simulated
//! nodes millions of messages are in flight, and every push and pop moves
//! heap entries along a path of the heap. Here the heap holds a 16-byte key
//! and a slot number; the events sit still in a slab whose slots are reused,
//! so an event costs neither a move of its message nor an allocation.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

#[derive(Debug)]
pub struct EventQueue<E> {
    /// (time in nanoseconds << 64 | sequence number, slot).
    heap: BinaryHeap<Reverse<(u128, usize)>>,
    slots: Vec<Option<E>>,
    free: Vec<usize>,
    seq: u64,
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        EventQueue { heap: BinaryHeap::new(), slots: Vec::new(), free: Vec::new(), seq: 0 }
    }
}

impl<E> EventQueue<E> {
    /// Queues `event` at `at` (times past 584 years count as that).
    pub fn push(&mut self, at: Duration, event: E) {
        self.seq += 1;
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
        self.heap.push(Reverse(((u128::from(nanos) << 64) | u128::from(self.seq), slot)));
    }

    /// The time of the earliest event.
    pub fn peek_time(&self) -> Option<Duration> {
        self.heap.peek().map(|Reverse((key, _))| Duration::from_nanos((key >> 64) as u64))
    }

    /// The earliest event and its time.
    pub fn pop(&mut self) -> Option<(Duration, E)> {
        let Reverse((key, slot)) = self.heap.pop()?;
        let event = self.slots[slot].take()?;
        self.free.push(slot);
        Some((Duration::from_nanos((key >> 64) as u64), event))
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
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
    fn events_come_out_by_time_then_in_the_order_they_were_pushed() {
        let mut q = EventQueue::default();
        let ms = Duration::from_millis;
        for (t, e) in [(5, 'a'), (1, 'b'), (5, 'c'), (3, 'd'), (1, 'e')] {
            q.push(ms(t), e);
        }
        assert_eq!(q.peek_time(), Some(ms(1)));
        let first: Vec<_> = (0..3).map(|_| q.pop().unwrap()).collect();
        assert_eq!(first, [(ms(1), 'b'), (ms(1), 'e'), (ms(3), 'd')]);
        // Freed slots are reused; order still holds.
        q.push(ms(4), 'f');
        q.push(ms(5), 'g');
        assert_eq!(q.len(), 4);
        let mut rest: Vec<char> = q.iter().copied().collect();
        rest.sort();
        assert_eq!(rest, ['a', 'c', 'f', 'g']);
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).map(|(_, e)| e).collect();
        assert_eq!(order, ['f', 'a', 'c', 'g']);
        assert!(q.is_empty() && q.pop().is_none() && q.peek_time().is_none());
        assert_eq!(q.slots.len(), 5, "no slot was added while one was free");
    }

    #[test]
    fn times_beyond_the_key_saturate_and_sort_last() {
        let mut q = EventQueue::default();
        q.push(Duration::MAX, 1);
        q.push(Duration::from_secs(1), 2);
        assert_eq!(q.pop(), Some((Duration::from_secs(1), 2)));
        assert_eq!(q.pop(), Some((Duration::from_nanos(u64::MAX), 1)));
    }
}
