//! Memory pages: huge pages for the graph's large arrays, and the heap's free pages handed back after an index
//! loads.
//!
//! A search reads a few hundred rows scattered over the vectors array, their link lists and its visited
//! list. On 4 KiB pages nearly every such read also misses the TLB; on 2 MiB pages far fewer do (measured:
//! +19–21% QPS at 100k rows on one host with the kernel's transparent huge pages switched to `always`, +0–20%
//! by index size on another with this module's request; `docs/benchmarks/search.md`, "Huge pages"). Most
//! nodes leave them at `madvise`: only memory a process asks for gets them. [`reserve`] asks for the buffers
//! that hold the graph.
//!
//! The request is `madvise(MADV_HUGEPAGE)` over the 2 MiB-aligned part of a buffer's allocation: advice that
//! changes which pages back the memory, never its contents, so a refusal (THP `never`, an old kernel) is
//! ignored. Calling it is one of this module's two `unsafe`s: the range lies inside the `Vec`'s own allocation
//! (`as_ptr()` to `as_ptr() + capacity × size_of::<T>()`), which stays alive and in place for the call.
//!
//! Opening an index reads its rows files as Arrow batches, keeps a few of their columns and drops the rest;
//! glibc's allocator keeps the pages those dropped buffers held, below what stays alive, resident but unused
//! (a 1M-row index: 270 MB of its 2.70 GB). [`release_free_heap`] hands them back (`malloc_trim(0)`, the other
//! `unsafe`: it frees no live allocation, only pages no allocation uses).
#![allow(unsafe_code)]

/// The huge page size asked for (x86-64 and aarch64 with 4 KiB base pages).
const HUGE: usize = 2 << 20;

/// Reserves room for `extra` more elements of `v` and asks that its allocation be backed by huge pages
/// (those 2 MiB pages it wholly covers: an allocation under 2 MiB gets none).
pub fn reserve<T>(v: &mut Vec<T>, extra: usize) {
    v.reserve(extra);
    advise(v.as_ptr() as usize, v.capacity() * std::mem::size_of::<T>());
}

/// The 2 MiB-aligned range inside `start..start + bytes`, if any.
fn aligned(start: usize, bytes: usize) -> Option<(usize, usize)> {
    let from = start.checked_next_multiple_of(HUGE)?;
    let to = start.checked_add(bytes)? / HUGE * HUGE;
    (to > from).then(|| (from, to - from))
}

fn advise(start: usize, bytes: usize) {
    let Some((from, len)) = aligned(start, bytes) else { return };
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `from..from + len` lies inside one live allocation of the caller's (see the module's
        // documentation); MADV_HUGEPAGE reads and writes no memory.
        let rc = unsafe { libc::madvise(from as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            tracing::trace!(error = %std::io::Error::last_os_error(), "huge pages refused");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (from, len);
}

/// Hands the heap's wholly free pages back to the kernel (every arena's): call it after a load that dropped
/// much of what it allocated. True when memory was returned; false elsewhere than glibc, where it does
/// nothing.
pub fn release_free_heap() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim(0) returns to the kernel only pages inside free chunks of the allocator's heaps;
        // no live allocation moves or changes, and it takes the allocator's locks itself.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_huge_pages_inside_the_buffer_are_advised() {
        assert_eq!(aligned(0, HUGE - 1), None);
        assert_eq!(aligned(1, 10), None, "a small buffer after a boundary");
        assert_eq!(aligned(1, 2 * HUGE), Some((HUGE, HUGE)));
        assert_eq!(aligned(HUGE, 3 * HUGE + 5), Some((HUGE, 3 * HUGE)));
        assert_eq!(aligned(HUGE + 1, 2 * HUGE), Some((2 * HUGE, HUGE)));
        assert_eq!(aligned(HUGE + 1, 2 * HUGE - 2), None);
        assert_eq!(aligned(usize::MAX - 10, 100), None);
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn dropped_buffers_below_a_live_one_are_handed_back() {
        // 512 MiB in 4 KiB buffers (each written, so resident), then one kept buffer above them: dropping the
        // rest leaves free pages the allocator keeps, as an index's dropped batches do.
        const MIB: usize = 1 << 20;
        let resident = || geossl_tests::server::process_rss_kib("self").expect("this process's VmRSS") * 1024;
        let mut buffers: Vec<Vec<u8>> = (0..(512 * MIB / 4096)).map(|i| vec![i as u8; 4096]).collect();
        let kept = vec![1u8; 4096];
        buffers.clear();
        buffers.shrink_to_fit();
        let before = resident();
        assert!(release_free_heap(), "malloc_trim returned nothing");
        let after = resident();
        assert!(
            before.saturating_sub(after) >= 256 * MIB as u64,
            "resident {} MiB before, {} MiB after: under half of the 512 MiB dropped was returned",
            before / MIB as u64,
            after / MIB as u64
        );
        assert_eq!(kept.iter().map(|&b| b as usize).sum::<usize>(), 4096, "the kept buffer is intact");
    }

    #[test]
    fn a_reserved_buffer_keeps_its_contents_and_grows() {
        let mut v: Vec<u32> = (0..1000).collect();
        reserve(&mut v, 3 * HUGE);
        assert!(v.capacity() >= 1000 + 3 * HUGE);
        v.extend(1000..2000);
        assert!(v.iter().enumerate().all(|(i, &x)| x as usize == i));
    }
}
