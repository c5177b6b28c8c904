//! Giving startup-only code pages back once the agent is up.
//!
//! Starting the agent runs a lot of code exactly once: argument parsing, loading the
//! eBPF programs (parsing the kernel's BTF), the first control-plane sync. The pages
//! of the binary holding that code stay mapped, and counted in the agent's RSS, for
//! the life of the process, although an idle agent never runs them again. The
//! kernel's fault-around makes it worse: every code fault maps up to 16 neighbouring
//! pages.
//!
//! [`release_code_pages`] unmaps the read-only, file-backed pages of the process (its
//! code and constants) with `MADV_DONTNEED`. They stay in the page cache, and the
//! next access to any of them maps it again from there (a minor fault, no I/O), so
//! the agent afterwards holds only the code it really runs. Pages the process has
//! written to (copy-on-write pages of a private mapping, such as relocated data
//! made read-only by RELRO) are anonymous memory whose contents exist nowhere else:
//! they are found through `/proc/self/pagemap` and never touched.

#![allow(unsafe_code)] // system calls the std library does not wrap (see the `SAFETY` notes)

use std::io::{self, Read, Seek, SeekFrom};

/// What [`release_code_pages`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// Read-only file mappings looked at.
    pub mappings: usize,
    /// Resident file pages unmapped, in bytes.
    pub bytes: u64,
    /// Resident pages kept because the process wrote to them (anonymous), in bytes.
    pub kept_bytes: u64,
}

/// A read-only private mapping of a regular file, from `/proc/self/maps`.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
}

/// Parses the lines of `/proc/<pid>/maps` that are readable, not writable, private, and
/// backed by a file path (not `[heap]`, `[vdso]`, anonymous or device memory).
fn read_only_file_mappings(maps: &str) -> Vec<Mapping> {
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let range = f.next()?;
            let perms = f.next()?;
            let (_offset, _dev, inode) = (f.next()?, f.next()?, f.next()?);
            let path = f.next()?;
            let p = perms.as_bytes();
            if p.len() != 4 || p[0] != b'r' || p[1] == b'w' || p[3] != b'p' {
                return None;
            }
            if inode == "0" || !path.starts_with('/') || path.starts_with("/dev/") {
                return None;
            }
            let (s, e) = range.split_once('-')?;
            Some(Mapping {
                start: usize::from_str_radix(s, 16).ok()?,
                end: usize::from_str_radix(e, 16).ok()?,
            })
        })
        .collect()
}

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const FILE_OR_SHARED: u64 = 1 << 61;

/// Whether a page with this pagemap entry may be unmapped without losing data:
/// not resident at all, or resident and backed by the file (never written).
fn droppable(entry: u64) -> bool {
    if entry & SWAPPED != 0 {
        return false;
    }
    entry & PRESENT == 0 || entry & FILE_OR_SHARED != 0
}

/// Unmaps the resident, never-written pages of every read-only private file mapping
/// of this process (see the module docs). Safe to call at any time: an unmapped page
/// is mapped again from the page cache on its next access.
pub fn release_code_pages() -> io::Result<Released> {
    walk(true)
}

fn walk(release: bool) -> io::Result<Released> {
    let page = page_size();
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut pagemap = std::fs::File::open("/proc/self/pagemap")?;
    let mut out = Released::default();
    let mut entries = Vec::new();
    for m in read_only_file_mappings(&maps) {
        out.mappings += 1;
        let pages = (m.end - m.start) / page;
        entries.resize(pages * 8, 0u8);
        pagemap.seek(SeekFrom::Start((m.start / page) as u64 * 8))?;
        pagemap.read_exact(&mut entries)?;
        let mut run_start: Option<usize> = None;
        for i in 0..=pages {
            let entry = (i < pages).then(|| {
                let b: [u8; 8] = entries[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]);
                u64::from_le_bytes(b)
            });
            match entry {
                Some(e) if droppable(e) => {
                    if e & PRESENT != 0 {
                        out.bytes += page as u64;
                    }
                    run_start.get_or_insert(i);
                }
                _ => {
                    if let Some(e) = entry {
                        if e & PRESENT != 0 {
                            out.kept_bytes += page as u64;
                        }
                    }
                    if let Some(s) = run_start.take() {
                        if release {
                            dont_need(m.start + s * page, (i - s) * page)?;
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Calls [`release_code_pages`] now and then every `every`, logging the first
/// result (info) and the later ones (debug). Returns only if it fails.
pub async fn release_code_pages_every(every: std::time::Duration) {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let mut first = true;
    loop {
        let before = rss_bytes().unwrap_or(0);
        let t = std::time::Instant::now();
        let r = match tokio::task::spawn_blocking(release_code_pages).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not give back code pages; not trying again");
                return;
            }
            Err(_) => return,
        };
        let took_us = t.elapsed().as_micros();
        let after = rss_bytes().unwrap_or(0);
        if first {
            tracing::info!(
                released_mib = format_args!("{:.1}", mib(r.bytes)),
                rss_before_mib = format_args!("{:.1}", mib(before)),
                rss_after_mib = format_args!("{:.1}", mib(after)),
                took_us,
                "gave back startup code pages"
            );
        } else {
            tracing::debug!(
                released = r.bytes,
                rss_after = after,
                took_us,
                "gave back code pages"
            );
        }
        first = false;
        tokio::time::sleep(every).await;
    }
}

fn dont_need(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: `addr..addr + len` lies inside a read-only private file mapping of this
    // process, and every resident page in it is an unmodified page of the file
    // (checked in pagemap just before; nothing writes to read-only mappings). After
    // MADV_DONTNEED the next access maps the same bytes again from the file, so no
    // memory the program can observe changes.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|p| *p > 0).unwrap_or(4096)
}

/// Resident set size of this process in bytes, from `/proc/self/statm`.
pub fn rss_bytes() -> io::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "/proc/self/statm"))?;
    Ok(pages * page_size() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_read_only_private_file_mappings_are_candidates() {
        let maps = "\
5581d1a00000-5581d1c00000 r--p 00000000 08:01 1234 /usr/bin/weft-node
5581d1c00000-5581d2a00000 r-xp 00200000 08:01 1234 /usr/bin/weft-node
5581d2a00000-5581d2b00000 r--p 01000000 08:01 1234 /usr/bin/weft-node
5581d2b00000-5581d2c00000 rw-p 01100000 08:01 1234 /usr/bin/weft-node
5581d3000000-5581d3100000 rw-p 00000000 00:00 0 [heap]
7f0000000000-7f0000001000 r--s 00000000 00:05 77 /dev/shm/x
7f0000002000-7f0000003000 r--s 00000000 08:01 99 /var/lib/shared
7f0000004000-7f0000005000 r--p 00000000 00:0f 88 /dev/zero
7f0000006000-7f0000007000 r-xp 00000000 00:00 0
7f0000008000-7f0000009000 ---p 00000000 00:01 5 /memfd:wasm-image (deleted)
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
";
        assert_eq!(
            read_only_file_mappings(maps),
            vec![
                Mapping {
                    start: 0x5581d1a00000,
                    end: 0x5581d1c00000
                },
                Mapping {
                    start: 0x5581d1c00000,
                    end: 0x5581d2a00000
                },
                Mapping {
                    start: 0x5581d2a00000,
                    end: 0x5581d2b00000
                },
            ]
        );
    }

    #[test]
    fn written_and_swapped_pages_are_never_dropped() {
        assert!(droppable(0), "not resident");
        assert!(
            droppable(PRESENT | FILE_OR_SHARED | 0x1234),
            "clean file page"
        );
        assert!(
            !droppable(PRESENT | 0x1234),
            "copy-on-write (anonymous) page"
        );
        assert!(!droppable(SWAPPED), "swapped-out anonymous page");
    }

    /// Whether the page holding `addr` is mapped in this process.
    fn resident(addr: usize) -> bool {
        let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
        f.seek(SeekFrom::Start((addr / page_size()) as u64 * 8))
            .unwrap();
        let mut b = [0u8; 8];
        f.read_exact(&mut b).unwrap();
        u64::from_le_bytes(b) & PRESENT != 0
    }

    /// Unmapping this test binary's own constants and code while it runs: a page of
    /// a read-only table leaves, comes back with its contents when read, and code and
    /// relocated data keep working. (Whole-process RSS is no measure here: the other
    /// tests, running in parallel, map code back in.)
    #[test]
    fn released_code_pages_leave_and_come_back_intact() {
        // 1 MiB of constants: the middle page is only ever touched through TABLE, so
        // neither other threads nor the kernel's fault-around map it back early.
        static TABLE: [u8; 1 << 20] = [7; 1 << 20];
        let table = std::hint::black_box(&TABLE);
        let middle = table.as_ptr() as usize + table.len() / 2;
        assert_eq!(table.iter().map(|&b| u64::from(b)).sum::<u64>(), 7 << 20);
        assert!(resident(middle));
        let r = release_code_pages().unwrap();
        assert!(r.mappings >= 2 && r.bytes >= 1 << 20, "{r:?}");
        assert!(!resident(middle), "the table is still mapped: {r:?}");
        assert_eq!(table.iter().map(|&b| u64::from(b)).sum::<u64>(), 7 << 20);
        assert!(resident(middle));
        // Relocated, RELRO-protected data (a vtable behind a trait object) was kept
        // and still works.
        assert!(r.kept_bytes > 0, "no written pages were found: {r:?}");
        let d: Box<dyn std::fmt::Display> = Box::new(42);
        assert_eq!(d.to_string(), "42");
    }
}
