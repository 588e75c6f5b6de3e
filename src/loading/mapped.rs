//! Zero-copy weights: CPU tensors whose data is the safetensors file's own memory map, so loading a model from a
//! warm page cache copies nothing and resident memory holds each weight once (as the file's cached pages).
//!
//! candle's CPU tensors own their data as a `Vec`, which frees it through the global allocator when the tensor
//! goes. A `Vec` over mapped memory is therefore only sound when the global allocator knows that memory and does
//! not hand it to the system allocator: [`MappedAwareAllocator`] is that allocator. A program opts in by installing
//! it (the `dreamshaper` binary does):
//!
//! ```no_run
//! use dreamshaper::loading::mapped::MappedAwareAllocator;
//!
//! #[global_allocator]
//! static ALLOCATOR: MappedAwareAllocator = MappedAwareAllocator;
//!
//! fn main() {}
//! ```
//!
//! Without it, [`zero_copy_available`] is false and weights are read into memory of their own, as before.
//!
//! Each mapped file is a [`Mapping`]: it counts the live tensors over it (plus one for its owner) and unmaps the file
//! when the last one is freed. Mappings are private and writable, so a write into a tensor (candle never writes into
//! an input) would copy the page, never touch the file.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

/// Slots for simultaneously mapped files (a model component has 1–4; several components may be alive at once).
const SLOTS: usize = 64;

struct Slot {
    start: AtomicUsize,
    end: AtomicUsize,
    /// Live tensors over this mapping plus one for its owner; the mapping is unmapped when it falls to zero.
    refs: AtomicUsize,
    /// 0 free, 1 being set up or torn down, 2 live (ranges valid).
    state: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    refs: AtomicUsize::new(0),
    state: AtomicUsize::new(0),
};
static REGIONS: [Slot; SLOTS] = [EMPTY; SLOTS];
/// Live mappings: the allocator's free path skips the slot scan when there are none.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);
static DISABLED: AtomicBool = AtomicBool::new(false);

/// Whether weights loaded from now on share their files' memory maps: the running program's global allocator is
/// [`MappedAwareAllocator`] (it has served an allocation) and [`set_zero_copy`] has not turned it off.
pub fn zero_copy_available() -> bool {
    INSTALLED.load(SeqCst) && !DISABLED.load(SeqCst)
}

/// Turns zero-copy loading off (weights are then read into memory of their own) or back on, for weights loaded
/// afterwards. Off is right when the model files may change while they are in use.
pub fn set_zero_copy(enabled: bool) {
    DISABLED.store(!enabled, SeqCst);
}

/// The number of files currently mapped for tensors (for tests and diagnostics).
pub fn live_mappings() -> usize {
    LIVE.load(SeqCst)
}

/// The slot whose live mapping contains `ptr`.
fn slot_of(ptr: *const u8) -> Option<&'static Slot> {
    if LIVE.load(SeqCst) == 0 {
        return None;
    }
    let p = ptr as usize;
    REGIONS.iter().find(|s| s.state.load(SeqCst) == 2 && s.start.load(SeqCst) <= p && p < s.end.load(SeqCst))
}

/// Drops one reference to a slot's mapping, unmapping it with the last one.
fn release(slot: &'static Slot) {
    if slot.refs.fetch_sub(1, SeqCst) == 1 {
        let (start, end) = (slot.start.load(SeqCst), slot.end.load(SeqCst));
        slot.state.store(1, SeqCst);
        LIVE.fetch_sub(1, SeqCst);
        // SAFETY: [start, end) is the whole mapping made in `Mapping::open`; no tensor refers to it any more.
        #[cfg(unix)]
        unsafe {
            libc::munmap(start as *mut libc::c_void, end - start)
        };
        slot.state.store(0, SeqCst);
    }
}

/// Drops this process's page-table entries for the whole pages of a freed tensor (the file's pages stay in the
/// page cache), so that a weight converted at load (to bf16, or transposed) is not counted twice in resident memory
/// while the rest of its file stays mapped.
fn drop_pages(ptr: *mut u8, len: usize) {
    #[cfg(unix)]
    {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
        let (start, end) = (ptr as usize, ptr as usize + len);
        let (first, last) = (start.div_ceil(page) * page, end / page * page);
        if last > first {
            // SAFETY: [first, last) lies inside a private file mapping that no live tensor uses (the freed tensor
            // was the only one over these whole pages: tensors do not overlap); MADV_DONTNEED on a private file
            // mapping only makes later reads fault the file's pages back in.
            unsafe { libc::madvise(first as *mut libc::c_void, last - first, libc::MADV_DONTNEED) };
        }
    }
}

/// The system allocator, plus: freeing memory that lies in a live [`Mapping`] releases the mapping's reference
/// instead (the memory was never allocated).
///
/// # Safety
///
/// Allocation is [`System`]'s, unchanged. Freeing and reallocating are [`System`]'s for every pointer outside the
/// mappings this module made, and those are the only pointers System handed out; a pointer inside one is one of
/// [`Mapping::vec`]'s buffers. Zero-copy tensors are sound under these assumptions:
///
/// - **It is the global allocator.** [`zero_copy_available`] takes the first allocation this allocator serves as
///   proof that it is installed with `#[global_allocator]`: `Vec`s over mapped memory are freed through the global
///   allocator, and any other would hand them to the system allocator. Calling its methods directly while another
///   allocator is global breaks this (nothing in this crate does).
/// - **Buffers are freed as they were made.** A buffer from [`Mapping::vec`] is freed or grown only through this
///   allocator (`Vec` does so), with the layout the `Vec` was made with: `dealloc` drops the process's copies of the
///   whole pages in that range (`MADV_DONTNEED`), then one reference to the mapping; `realloc` copies the bytes out
///   into a System allocation. Slots are found by address, so the mapping's range must not be unmapped or reused
///   while a buffer lies in it (the reference counts see to that).
/// - **Nobody writes through a mapped buffer that another live buffer shares.** The same tensor read twice gives two
///   `Vec`s over the same bytes. Candle never writes into its inputs, and weights are only inputs; a write would
///   stay private to this process (the mapping is `MAP_PRIVATE`), show in the other buffer, and be dropped when
///   either buffer is freed.
/// - **The files do not change while mapped.** As with every memory map, another process truncating or rewriting a
///   file changes (or unmaps) memory that Rust code holds as immutable data; [`set_zero_copy`]`(false)` turns
///   mapping off where files may change.
/// - **System's memory and the mappings are disjoint.** A pointer inside a live mapping is taken for a mapped
///   buffer; this holds because `mmap` never returns pages System holds, and System never allocates inside a live
///   mapping.
pub struct MappedAwareAllocator;

// SAFETY: see the type's `# Safety` section: every allocation is System's; the only memory not passed back to
// System is memory System never gave out (inside a mapping this module made and registered).
unsafe impl GlobalAlloc for MappedAwareAllocator {
    /// # Safety
    /// [`GlobalAlloc::alloc`]'s contract: `layout` has a non-zero size.
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(std::sync::atomic::Ordering::Relaxed) {
            INSTALLED.store(true, SeqCst);
        }
        System.alloc(layout)
    }

    /// # Safety
    /// [`GlobalAlloc::alloc_zeroed`]'s contract: `layout` has a non-zero size.
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !INSTALLED.load(std::sync::atomic::Ordering::Relaxed) {
            INSTALLED.store(true, SeqCst);
        }
        System.alloc_zeroed(layout)
    }

    /// # Safety
    /// [`GlobalAlloc::dealloc`]'s contract: `ptr` was allocated by this allocator with `layout`, or is the buffer of a
    /// `Vec` made by [`Mapping::vec`] whose capacity in bytes is `layout.size()`.
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match slot_of(ptr) {
            Some(slot) => {
                drop_pages(ptr, layout.size());
                release(slot)
            }
            None => System.dealloc(ptr, layout),
        }
    }

    /// # Safety
    /// [`GlobalAlloc::realloc`]'s contract: `ptr` as for [`dealloc`](Self::dealloc), `new_size` non-zero and, rounded
    /// up to `layout.align()`, at most `isize::MAX`.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        match slot_of(ptr) {
            Some(slot) => {
                let new = System.alloc(Layout::from_size_align_unchecked(new_size, layout.align()));
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    release(slot);
                }
                new
            }
            None => System.realloc(ptr, layout, new_size),
        }
    }
}

/// A file mapped for zero-copy tensors; dropping it releases the owner's reference (tensors keep it mapped).
pub struct Mapping {
    slot: &'static Slot,
    len: usize,
}

impl Mapping {
    /// Maps `path` when zero-copy is available; `None` otherwise (or when mapping fails: callers then read the file).
    pub fn open(path: &Path) -> Option<Self> {
        if !zero_copy_available() {
            return None;
        }
        Self::map(path)
    }

    #[cfg(unix)]
    fn map(path: &Path) -> Option<Self> {
        use std::os::unix::io::AsRawFd;
        let file = std::fs::File::open(path).ok()?;
        let len = usize::try_from(file.metadata().ok()?.len()).ok()?;
        if len == 0 {
            return None;
        }
        let slot = REGIONS.iter().find(|s| s.state.compare_exchange(0, 1, SeqCst, SeqCst).is_ok())?;
        // SAFETY: a fresh private mapping of a file we opened; as with every mmap, the file changing underneath
        // while mapped is undefined, which every safetensors loader accepts.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            slot.state.store(0, SeqCst);
            return None;
        }
        slot.start.store(base as usize, SeqCst);
        slot.end.store(base as usize + len, SeqCst);
        slot.refs.store(1, SeqCst);
        LIVE.fetch_add(1, SeqCst);
        slot.state.store(2, SeqCst);
        Some(Self { slot, len })
    }

    #[cfg(not(unix))]
    fn map(_path: &Path) -> Option<Self> {
        None
    }

    /// The mapped bytes `[start, end)` of the file as a `Vec<T>` that shares the mapping (no copy), or `None` if
    /// the range is out of the file or misaligned for `T`.
    pub fn vec<T: bytemuck::Pod>(&self, start: usize, end: usize) -> Option<Vec<T>> {
        let size = std::mem::size_of::<T>();
        if start > end || end > self.len || !(end - start).is_multiple_of(size) || end == start {
            return None;
        }
        let ptr = (self.slot.start.load(SeqCst) + start) as *mut T;
        if !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
            return None;
        }
        self.slot.refs.fetch_add(1, SeqCst);
        let count = (end - start) / size;
        // SAFETY: the range lies inside the live mapping, is aligned for T, and T is plain old data. The Vec's
        // buffer is freed through MappedAwareAllocator (installed, or this Mapping could not exist), which releases
        // this reference instead of freeing; Vec<T> never reallocates without being asked to grow, and a realloc
        // also goes to the allocator, which copies out of the mapping.
        Some(unsafe { Vec::from_raw_parts(ptr, count, count) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        release(self.slot);
    }
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapping({} bytes at {:#x})", self.len, self.slot.start.load(SeqCst))
    }
}
