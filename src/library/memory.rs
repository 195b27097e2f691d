//! Giving the memory of large decodes back to the system.
//!
//! The binary sets mimalloc to keep freed pages (no purge delay: inference
//! and training reuse the same large buffers at every step, and returning
//! them costs page faults; measured, a server answering text queries at
//! 130 req/s drops to 123 with a one-second delay). A server that decodes a
//! 64-megapixel upload must still not keep that spike resident for its
//! whole life: while a [`ReleaseWindow`] is open, freed pages go back to
//! the system at once, and closing the last one collects what is left.

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
