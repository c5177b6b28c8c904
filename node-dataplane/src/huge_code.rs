//! The agent's per-request code on a 2 MiB huge page.
//!
//! `weft-node` is linked with the functions it runs for every request together in
//! one section, `.text.hot`, starting on a 2 MiB boundary (link/README.md). On a
//! busy node each request meets a cold TLB: the application, the kernel and the
//! other processes ran in between, and on a virtual machine every TLB miss walks two
//! levels of page tables. Mapped in 4 KiB pages that code takes a TLB entry per page
//! (about 160 per request); on one huge page it takes one.
//!
//! The kernel maps a binary's code from the page cache in 4 KiB pages (huge pages
//! for file-backed code need `CONFIG_READ_ONLY_THP_FOR_FS`, which many kernels lack).
//! [`map_hot_code_huge`] copies the 2 MiB ranges holding `.text.hot` into anonymous
//! memory backed by a transparent huge page, makes the copy executable, and moves it
//! over the original range with one `mremap`: the code at those addresses is never
//! missing, not even for an instant, so it is safe with other threads running.
//!
//! What it costs: the range becomes private memory (2 MiB of RSS instead of shared
//! page cache), and a profiler attached afterwards sees anonymous memory there and
//! cannot name the functions in it (turn it off with `--huge-code off` to profile).
//! When the kernel gives no huge page (transparent huge pages `never`, or no free
//! 2 MiB block), nothing changes.

use std::io;
use std::path::Path;

/// Huge page size on x86-64 and arm64 (4 KiB base pages).
pub const HUGE_PAGE: usize = 2 << 20;

/// Where this process's executable code was loaded: the load bias (address in
/// memory minus address in the binary) and the range of its executable segments,
/// in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedCode {
    pub bias: u64,
    pub start: u64,
    pub end: u64,
}

impl LoadedCode {
    /// Whether `addr` (in memory) is in the executable's code.
    pub fn holds(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }
}

/// This process's executable code, from the dynamic loader (the first object
/// `dl_iterate_phdr` reports is the executable itself).
pub fn executable_code() -> Option<LoadedCode> {
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: the loader passes a valid record whose `dlpi_phdr` points at
        // `dlpi_phnum` program headers; `data` is the `Option<LoadedCode>` below.
        let (info, out) = unsafe { (&*info, &mut *(data as *mut Option<LoadedCode>)) };
        // SAFETY: as above.
        let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum.into()) };
        let exec = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_LOAD && p.p_flags & libc::PF_X != 0);
        let start = exec.clone().map(|p| p.p_vaddr).min();
        let end = exec.map(|p| p.p_vaddr + p.p_memsz).max();
        if let (Some(start), Some(end)) = (start, end) {
            let bias = info.dlpi_addr;
            *out = Some(LoadedCode {
                bias,
                start: bias + start,
                end: bias + end,
            });
        }
        1
    }
    let mut code: Option<LoadedCode> = None;
    // SAFETY: `first` only reads the records it is given and writes `code`.
    unsafe { libc::dl_iterate_phdr(Some(first), (&raw mut code).cast()) };
    code
}

#[derive(Debug, thiserror::Error)]
pub enum HugeCodeError {
    #[error("reading the section headers of {path}: {source}")]
    ReadExe {
        path: String,
        source: object::read::Error,
    },
    #[error("opening {path}: {source}")]
    OpenExe { path: String, source: io::Error },
    #[error("the dynamic loader reports no executable segment")]
    NoCode,
    #[error(".text.hot is loaded at {addr:#x}, not on a {HUGE_PAGE}-byte boundary (is the binary linked with link/hot-text.ld?)")]
    NotAligned { addr: u64 },
    #[error(".text.hot's huge pages {start:#x}-{end:#x} reach outside the executable's code {code_start:#x}-{code_end:#x}")]
    OutsideCode {
        start: u64,
        end: u64,
        code_start: u64,
        code_end: u64,
    },
    #[error("{call}: {source}")]
    Syscall {
        call: &'static str,
        source: io::Error,
    },
}

/// What [`map_hot_code_huge`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugeCode {
    /// The hot code now runs from a copy of `len` bytes from `start`, of which
    /// `huge` bytes are on huge pages (all of them, unless the kernel split one).
    Mapped { start: u64, len: usize, huge: u64 },
    /// The binary has no `.text.hot` section (not linked with the layout).
    NoHotSection,
    /// The kernel gave no huge page for the copy; the code stays as it was.
    NoHugePage,
}

/// Moves `.text.hot` of this process's executable onto transparent huge pages
/// (module docs). Call it early, once.
pub fn map_hot_code_huge() -> Result<HugeCode, HugeCodeError> {
    let code = executable_code().ok_or(HugeCodeError::NoCode)?;
    let Some((addr, size)) = hot_section(Path::new("/proc/self/exe"))? else {
        return Ok(HugeCode::NoHotSection);
    };
    let start = code.bias + addr;
    // The section's 2 MiB alignment makes the kernel load the binary at a 2 MiB
    // aligned address too; a huge page cannot be mapped anywhere else.
    if start % HUGE_PAGE as u64 != 0 {
        return Err(HugeCodeError::NotAligned { addr: start });
    }
    let len = (size as usize).div_ceil(HUGE_PAGE) * HUGE_PAGE;
    let end = start + len as u64;
    if start < code.start || end > code.end {
        return Err(HugeCodeError::OutsideCode {
            start,
            end,
            code_start: code.start,
            code_end: code.end,
        });
    }
    // SAFETY: [start, end) is this executable's mapped, readable code (checked
    // above against its loaded segments); `move_onto_huge_pages` replaces it with an
    // identical copy in one mremap.
    unsafe { move_onto_huge_pages(start as usize, len) }
}

/// The address in the binary and size of `path`'s `.text.hot` section, if any.
pub fn hot_section(path: &Path) -> Result<Option<(u64, u64)>, HugeCodeError> {
    use object::{Object, ObjectSection};
    let shown = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| HugeCodeError::OpenExe {
        path: shown.clone(),
        source,
    })?;
    let cache = object::ReadCache::new(file);
    let elf = object::File::parse(&cache).map_err(|source| HugeCodeError::ReadExe {
        path: shown,
        source,
    })?;
    Ok(elf
        .section_by_name(".text.hot")
        .map(|s| (s.address(), s.size())))
}

fn syscall_error(call: &'static str) -> HugeCodeError {
    HugeCodeError::Syscall {
        call,
        source: io::Error::last_os_error(),
    }
}

/// Copies `[start, start + len)` to anonymous huge pages and moves them over it.
///
/// # Safety
///
/// The range must be mapped and readable, `start` and `len` multiples of
/// [`HUGE_PAGE`]; its contents are replaced by an identical, read-only and
/// executable copy.
unsafe fn move_onto_huge_pages(start: usize, len: usize) -> Result<HugeCode, HugeCodeError> {
    use libc::{MAP_ANONYMOUS, MAP_FAILED, MAP_PRIVATE, PROT_EXEC, PROT_READ, PROT_WRITE};
    // A huge page needs a 2 MiB aligned address: reserve one page more and trim.
    // SAFETY: a fresh anonymous mapping, touching nothing else.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len + HUGE_PAGE,
            PROT_READ | PROT_WRITE,
            MAP_PRIVATE | MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == MAP_FAILED {
        return Err(syscall_error("mmap"));
    }
    let raw = raw as usize;
    let copy = raw.next_multiple_of(HUGE_PAGE);
    // SAFETY: both trimmed pieces lie inside the mapping just made, outside `copy`.
    unsafe {
        if copy > raw {
            libc::munmap(raw as *mut _, copy - raw);
        }
        let tail = raw + len + HUGE_PAGE - (copy + len);
        if tail > 0 {
            libc::munmap((copy + len) as *mut _, tail);
        }
    }
    let unmap = |e: HugeCodeError| {
        // SAFETY: `copy` is ours and nothing refers to it.
        unsafe { libc::munmap(copy as *mut _, len) };
        e
    };
    // SAFETY: advice on our own mapping.
    if unsafe { libc::madvise(copy as *mut _, len, libc::MADV_HUGEPAGE) } != 0 {
        return Err(unmap(syscall_error("madvise(MADV_HUGEPAGE)")));
    }
    // SAFETY: the source is readable (caller), the destination ours and writable,
    // and they do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(start as *const u8, copy as *mut u8, len) };
    let huge = std::fs::read_to_string("/proc/self/smaps")
        .map(|s| anon_huge_kib(&s, copy).unwrap_or(0))
        .unwrap_or(0);
    if huge * 1024 < len as u64 {
        // SAFETY: as in `unmap`.
        unsafe { libc::munmap(copy as *mut _, len) };
        return Ok(HugeCode::NoHugePage);
    }
    // SAFETY: our own mapping.
    if unsafe { libc::mprotect(copy as *mut _, len, PROT_READ | PROT_EXEC) } != 0 {
        return Err(unmap(syscall_error("mprotect")));
    }
    // SAFETY: moves our copy over the code range in one step (the caller's
    // contract); on failure the original mapping is untouched.
    let moved = unsafe {
        libc::mremap(
            copy as *mut _,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            start as *mut libc::c_void,
        )
    };
    if moved == MAP_FAILED {
        return Err(unmap(syscall_error("mremap")));
    }
    let huge = std::fs::read_to_string("/proc/self/smaps")
        .map(|s| anon_huge_kib(&s, start).unwrap_or(0))
        .unwrap_or(0);
    Ok(HugeCode::Mapped {
        start: start as u64,
        len,
        huge: huge * 1024,
    })
}

/// `AnonHugePages` (KiB) of the mapping starting at `start`, from `/proc/self/smaps`.
fn anon_huge_kib(smaps: &str, start: usize) -> Option<u64> {
    let range = |l: &str| {
        let (a, b) = l.split_whitespace().next()?.split_once('-')?;
        Some((
            usize::from_str_radix(a, 16).ok()?,
            usize::from_str_radix(b, 16).ok()?,
        ))
    };
    let mut lines = smaps
        .lines()
        .skip_while(|l| range(l).is_none_or(|(a, _)| a != start));
    lines.next()?;
    lines
        .take_while(|l| range(l).is_none())
        .find_map(|l| l.strip_prefix("AnonHugePages:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
7f0000000000-7f0000200000 rw-p 00000000 00:00 0 
Size:               2048 kB
AnonHugePages:         0 kB
7f0000400000-7f0000600000 rw-p 00000000 00:00 0 
Size:               2048 kB
Rss:                2048 kB
AnonHugePages:      2048 kB
VmFlags: rd wr mr mw me ac hg 
7f0000800000-7f0000801000 r--p 00000000 00:00 0 
AnonHugePages:         4 kB
";

    #[test]
    fn anon_huge_kib_reads_the_mapping_that_starts_there() {
        assert_eq!(anon_huge_kib(SMAPS, 0x7f0000400000), Some(2048));
        assert_eq!(anon_huge_kib(SMAPS, 0x7f0000000000), Some(0));
        assert_eq!(anon_huge_kib(SMAPS, 0x7f0000800000), Some(4));
        assert_eq!(anon_huge_kib(SMAPS, 0x7f0000200000), None);
    }

    #[test]
    fn executable_code_holds_this_binarys_functions() {
        let code = executable_code().expect("the executable has code");
        assert!(code.holds(anon_huge_kib as *const () as u64));
        let local = 0u8;
        assert!(!code.holds(&local as *const u8 as u64));
    }

    #[test]
    fn a_test_binary_has_no_hot_section_and_is_left_alone() {
        // Only weft-node (and the in-process benchmark) is linked with the layout.
        assert_eq!(hot_section(Path::new("/proc/self/exe")).unwrap(), None);
        assert_eq!(map_hot_code_huge().unwrap(), HugeCode::NoHotSection);
    }

    #[test]
    fn a_file_that_is_not_elf_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("not-elf");
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        let e = hot_section(&p).unwrap_err().to_string();
        assert!(e.contains("not-elf"), "{e}");
    }
}
