//! The process's memory: handing freed heap back, and reading the peak.
//!
//! A node's set-up allocates and frees tens of megabytes on the C heap: the
//! data set as loaded, the shard and held-out set copied out of it, libtorch's
//! first tensors. glibc keeps freed chunks inside its heap for reuse and only
//! returns memory from the heap's top, so those pages would stay resident for
//! the whole run, counted in every node's RSS. Trimming once, after set-up,
//! gives back every whole free page (glibc's `malloc_trim` also releases pages
//! in the middle of the heap) at the cost of one pass over the free lists.
//!
//! How many nodes fit one machine is a question users ask of `murmur
//! cluster`, so each node reports its peak (`summary.json`).

/// Returns free heap pages to the operating system; a no-op where the C
/// library is not glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn release_free_heap() {
    // SAFETY: malloc_trim only walks the allocator's own free lists under
    // its lock and advises the kernel about pages no allocation owns.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_heap() {}

/// Keeps freed heap for reuse instead of handing it back, for work that
/// frees and allocates the same sizes over and over; called once set-up is
/// done. With glibc's defaults the heap's top was trimmed and grown back,
/// and tensors over the (moving) mmap threshold mapped and unmapped, so the
/// kernel zeroed the same pages again and again:
/// - `murmur sim`'s millions of messages in flight: with 100,000 nodes a
///   tenth of the run's time (1.18 million minor faults in a 4-round run,
///   0.84 million without the trimming);
/// - a training step's activations (`murmur train`, a node's trainer):
///   chargpt at batch 32 faulted 3,000-8,000 pages a step, under 10 with
///   the heap kept, which took 5-7% off its step time.
///
/// The peak is unchanged (what is kept is reused; chargpt's grew 3%), but
/// the resident memory stays at the peak between steps. A no-op where the
/// C library is not glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn keep_freed_heap() {
    // SAFETY: mallopt only sets the allocator's tunables, under its lock;
    // a refused setting (it returns 0) leaves glibc's default in place.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_freed_heap() {}

/// The process's peak resident memory so far (`VmHWM`), where Linux tells it.
pub fn peak_rss_bytes() -> Option<u64> {
    peak_and_file_rss_bytes().0
}

/// The peak resident memory (`VmHWM`) and the part of the resident memory
/// that maps files now (`RssFile`), from one read of the process's status.
/// The files are libtorch's and murmur's code, shared by every node on the
/// host. Why it is reported: how much of it counts in RSS is the page
/// cache's business, not the node's. Once the kernel had gathered
/// libtorch's code into huge pages, every lenet node's peak RSS rose from
/// about 190 MB to 315 MB (168 MB of libtorch mapped in 2 MB pages), its
/// own memory unchanged. Mapped files are rarely dropped while a process
/// runs, so the peak less this, read at exit, is close to (and at most)
/// the node's own memory at its peak.
pub fn peak_and_file_rss_bytes() -> (Option<u64>, Option<u64>) {
    match std::fs::read_to_string("/proc/self/status") {
        Ok(status) => (field_bytes(&status, "VmHWM:"), field_bytes(&status, "RssFile:")),
        Err(_) => (None, None),
    }
}

/// A `/proc/PID/status` field given in kB (`VmHWM:`, `RssFile:`), in bytes.
fn field_bytes(status: &str, field: &str) -> Option<u64> {
    let kb = status.lines().find_map(|l| l.strip_prefix(field))?;
    kb.trim().strip_suffix("kB")?.trim().parse::<u64>().ok().map(|kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_and_file_memory_are_read_from_status() {
        let status = "Name:\tmurmur\nVmPeak:\t  900 kB\nVmHWM:\t  188004 kB\nVmRSS:\t 1 kB\n\
                      RssAnon:\t 5 kB\nRssFile:\t   81200 kB\n";
        assert_eq!(field_bytes(status, "VmHWM:"), Some(188_004 * 1024));
        assert_eq!(field_bytes(status, "RssFile:"), Some(81_200 * 1024));
        assert_eq!(field_bytes("VmHWM:\t12 MB\n", "VmHWM:"), None);
        assert_eq!(field_bytes("Name:\tx\n", "VmHWM:"), None);
        if cfg!(target_os = "linux") {
            release_free_heap();
            let (peak, file) = peak_and_file_rss_bytes();
            let (peak, file) = (peak.unwrap(), file.unwrap());
            assert!(peak > 1 << 20 && file > 0 && file < peak, "{peak} {file}");
        }
    }
}
