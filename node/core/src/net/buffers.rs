//! Receive buffers, reused. A payload lands in a model-sized buffer; a new
//! one each time costs page faults and the kernel's zeroing of every page
//! (about a sixth of the receiver's CPU for 64 MiB, scripts/bench_transfer.py).
//! Buffers the node is done with come back here (`Network::recycle`) and
//! the next payload of at most their size is read into one of them.
//!
//! A reused buffer holds stale values until the read overwrites them; the
//! reader hands a buffer on only after filling all of it.

use std::sync::{Mutex, MutexGuard};

use super::hugepages;

/// Spare buffers, at most `keep` of each kind.
#[derive(Debug)]
pub struct BufferPool {
    values: Mutex<Vec<Vec<f32>>>,
    bytes: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The spares are whole buffers at every point; a poisoned lock still holds them.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The spare with the least capacity that holds `n`, resized to `n`.
fn take<T: Copy + Default>(spares: &mut Vec<Vec<T>>, n: usize) -> Option<Vec<T>> {
    let best = (0..spares.len())
        .filter(|&i| spares[i].capacity() >= n)
        .min_by_key(|&i| spares[i].capacity())?;
    let mut v = spares.swap_remove(best);
    v.resize(n, T::default());
    Some(v)
}

impl BufferPool {
    pub fn new(keep: usize) -> BufferPool {
        BufferPool { values: Mutex::new(Vec::new()), bytes: Mutex::new(Vec::new()), keep }
    }

    /// A buffer of `n` values, reused if one is spare.
    pub fn values(&self, n: usize) -> Vec<f32> {
        take(&mut lock(&self.values), n).unwrap_or_else(|| hugepages::zeroed_f32(n))
    }

    /// A buffer of `n` bytes, reused if one is spare.
    pub fn bytes(&self, n: usize) -> Vec<u8> {
        take(&mut lock(&self.bytes), n).unwrap_or_else(|| hugepages::zeroed_bytes(n))
    }

    pub fn put_values(&self, v: Vec<f32>) {
        let mut spares = lock(&self.values);
        if spares.len() < self.keep && v.capacity() > 0 {
            spares.push(v);
        }
    }

    pub fn put_bytes(&self, v: Vec<u8>) {
        let mut spares = lock(&self.bytes);
        if spares.len() < self.keep && v.capacity() > 0 {
            spares.push(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spares_are_reused_smallest_fit_first_and_bounded() {
        let pool = BufferPool::new(2);
        let big = pool.values(1000);
        let small = pool.values(10);
        let (big_ptr, small_ptr) = (big.as_ptr(), small.as_ptr());
        pool.put_values(big);
        pool.put_values(small);
        pool.put_values(vec![0.0; 5]);
        let v = pool.values(8);
        assert_eq!((v.len(), v.as_ptr()), (8, small_ptr), "the small spare fits 8");
        let w = pool.values(999);
        assert_eq!((w.len(), w.as_ptr()), (999, big_ptr));
        assert_eq!(pool.values(3).len(), 3, "the third spare was not kept; a new one");
        let mut spare = Vec::with_capacity(8);
        spare.extend([7u8; 4]);
        pool.put_bytes(spare);
        assert_eq!(
            pool.bytes(6),
            [7, 7, 7, 7, 0, 0],
            "stale bytes stay until the read overwrites them"
        );
    }
}
