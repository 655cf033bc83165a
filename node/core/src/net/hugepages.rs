//! Fresh payload buffers backed by transparent huge pages.
//!
//! A received payload lands in a new, model-sized buffer. Touching 64 MiB of
//! fresh 4 KiB pages costs 16,384 page faults, about a quarter of the
//! receiver's CPU time for a 64 MiB payload (scripts/bench_transfer.py). On
//! Linux with transparent huge pages in `madvise` mode (the usual default),
//! advising the buffer before its first touch makes the kernel back it with
//! 2 MiB pages: 32 faults. The advice changes no contents; where it is not
//! supported the buffer is simply an ordinary one.

/// Huge page size on x86_64 and aarch64 Linux.
const HUGE_PAGE: usize = 2 << 20;

/// A zeroed vector of `n` values, asked to be backed by huge pages when it
/// is large enough to span some.
pub fn zeroed_f32(n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    advise(bytemuck::cast_slice_mut(&mut v));
    v
}

/// `zeroed_f32` for bytes.
pub fn zeroed_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    advise(&mut v);
    v
}

/// Advises the whole huge pages inside `buf`.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn advise(buf: &mut [u8]) {
    let start = buf.as_mut_ptr() as usize;
    let first = start.div_ceil(HUGE_PAGE) * HUGE_PAGE;
    let end = (start + buf.len()) / HUGE_PAGE * HUGE_PAGE;
    if end > first {
        // SAFETY: [first, end) lies inside `buf`, which this function borrows
        // mutably, and is page-aligned; MADV_HUGEPAGE only tells the kernel how
        // to back those pages and never changes their contents. The result is
        // advice: an error (no THP support) leaves an ordinary buffer.
        unsafe {
            libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn advise(_buf: &mut [u8]) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_and_of_the_asked_length() {
        for n in [0, 1, 1000, 3 * (HUGE_PAGE / 4) + 7] {
            let v = zeroed_f32(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 0.0));
            let b = zeroed_bytes(n);
            assert!(b.len() == n && b.iter().all(|&x| x == 0));
        }
    }
}
