//! Giving the memory of large decodes back to the system.
//!
//! The binary sets mimalloc to keep freed pages (no purge delay: inference
//! and training reuse the same large buffers at every step, and returning
//! them costs page faults; measured, a server answering text queries at
//! 130 req/s drops to 123 with a one-second delay). A server that decodes a
//! 64-megapixel upload must still not keep that spike resident for its
//! whole life: while a [`ReleaseWindow`] is open, freed pages go back to
//! the system at once, and closing the last one collects what is left.
//!
//! mimalloc is built without its advice for transparent huge pages
//! (libmimalloc-sys's `no_thp`): the system's policy decides, as for any
//! program. Advised, every fresh 2 MiB page cost about 18 ms to fault in on
//! a VM that reports free memory to its host, which made most of a model
//! load and 2 to 5 s of CPU in indexing 212 photos; inference throughput
//! did not change without it (BENCHMARKS.md).

use std::sync::Mutex;

/// `mi_option_purge_delay` (15 in mimalloc 2 and 3; libmimalloc-sys names
/// the option after it, not this one).
pub const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t =
    libmimalloc_sys::mi_option_use_numa_nodes - 1;

/// Open windows, and the purge delay to restore when the last one closes.
static WINDOWS: Mutex<(usize, i64)> = Mutex::new((0, 0));

/// While any window is open, memory freed anywhere in the process is
/// returned to the system immediately.
#[derive(Debug)]
pub struct ReleaseWindow(());

impl ReleaseWindow {
    pub fn open() -> Self {
        let mut windows = WINDOWS.lock().unwrap_or_else(|p| p.into_inner());
        if windows.0 == 0 {
            // SAFETY: mimalloc's option accessors are safe to call from any thread.
            windows.1 = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) } as i64;
            // SAFETY: as above.
            unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
        }
        windows.0 += 1;
        Self(())
    }
}

impl Drop for ReleaseWindow {
    fn drop(&mut self) {
        // SAFETY: mimalloc's collection entry point, valid from any thread.
        unsafe { libmimalloc_sys::mi_collect(true) };
        let mut windows = WINDOWS.lock().unwrap_or_else(|p| p.into_inner());
        windows.0 -= 1;
        if windows.0 == 0 {
            // SAFETY: as in `open`.
            unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, windows.1 as _) };
        }
    }
}

#[cfg(test)]
mod tests {
    /// The `VmFlags` line of the mapping of `/proc/self/smaps` that holds
    /// `address`.
    #[cfg(target_os = "linux")]
    fn flags_of_mapping_holding(address: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().unwrap_or("");
            if let Some((start, end)) = range.split_once('-') {
                if let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                ) {
                    inside = (start..end).contains(&address);
                    continue;
                }
            }
            if inside && line.starts_with("VmFlags:") {
                return line.to_string();
            }
        }
        panic!("no mapping holds {address:#x}");
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn the_allocator_leaves_huge_pages_to_the_system_policy() {
        // Large enough for mimalloc to take it from an arena it reserved
        // from the system, where its advice would be.
        let size = 64 << 20;
        // SAFETY: a plain allocation, freed below and touched only in range.
        let block = unsafe { libmimalloc_sys::mi_malloc(size) } as *mut u8;
        assert!(!block.is_null());
        // SAFETY: inside the block just allocated.
        unsafe { block.write_bytes(1, size) };
        let flags = flags_of_mapping_holding(block as usize);
        // SAFETY: allocated above by mimalloc, freed once.
        unsafe { libmimalloc_sys::mi_free(block.cast()) };
        assert!(
            !flags.split_whitespace().any(|flag| flag == "hg"),
            "mimalloc advised huge pages on its memory ({flags}): build it with `no_thp`"
        );
    }
}
