//! One allocation for all of a model's packed weights, laid out in the order
//! the forward pass reads them and backed by transparent huge pages where the
//! OS allows it.
//!
//! Why: a decode step streams every weight once (~96 MB for the demo model).
//! With 4 KiB pages that is ~24 000 TLB misses per token and the hardware
//! prefetchers stop at every page boundary; 2 MiB pages remove both (a plain
//! two-thread read of 96 MB runs ~13 GB/s on 4 KiB pages and ~20 GB/s on huge
//! pages on the dev box). Laying matrices out in reading order lets the
//! kernels' prefetch run on into the next matrix.
//!
//! Written once while loading, then shared read-only (`Arc`) by every thread.
//! The one `unsafe` is the `madvise` hint on our own allocation.
#![allow(unsafe_code)]

use std::sync::Arc;

/// Huge page size the buffer is aligned to.
const HUGE: usize = 2 << 20;

/// A zeroed buffer whose usable part starts on a 2 MiB boundary.
#[derive(Debug)]
pub struct Arena {
    buf: Vec<u8>,
    start: usize,
    len: usize,
}

impl Arena {
    /// `len` zeroed bytes. Large allocations come fresh from the OS, so the
    /// huge-page hint applies before any page is touched.
    pub fn new(len: usize) -> Self {
        let buf = vec![0u8; len + HUGE];
        let start = buf.as_ptr().align_offset(HUGE).min(HUGE);
        let mut arena = Self { buf, start, len };
        arena.advise_huge_pages();
        arena
    }

    #[cfg(target_os = "linux")]
    fn advise_huge_pages(&mut self) {
        if self.len < HUGE {
            return;
        }
        let region = &mut self.buf[self.start..self.start + self.len];
        // SAFETY: `region` is memory we own, `start` is 2 MiB (so page)
        // aligned, and MADV_HUGEPAGE only changes how the kernel backs the
        // pages, never their contents. Failure (THP disabled) is harmless.
        let _ = unsafe {
            rustix::mm::madvise(region.as_mut_ptr().cast(), region.len(), rustix::mm::Advice::LinuxHugepage)
        };
    }

    #[cfg(not(target_os = "linux"))]
    fn advise_huge_pages(&mut self) {}

    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.start + self.len]
    }
}

/// A byte range of a shared arena (one matrix's packed rows).
#[derive(Clone, Debug)]
pub struct Bytes {
    arena: Arc<Arena>,
    start: usize,
    len: usize,
}

impl Bytes {
    pub fn new(arena: Arc<Arena>, start: usize, len: usize) -> Self {
        assert!(start + len <= arena.len, "range outside the arena");
        Self { arena, start, len }
    }

    /// A small arena holding just `data` (tests, tiny matrices).
    pub fn copy_of(data: &[u8]) -> Self {
        let mut a = Arena { buf: data.to_vec(), start: 0, len: data.len() };
        a.len = a.buf.len();
        Self { len: a.len, arena: Arc::new(a), start: 0 }
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.arena.bytes()[self.start..self.start + self.len]
    }
}
