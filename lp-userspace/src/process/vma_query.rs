//! The mapping that holds an address in a process, asked of the kernel: `PROCMAP_QUERY`, an
//! ioctl on /proc/PID/maps (Linux 6.11 and later). A read of the maps text formats every
//! mapping of the process (~100 µs for a few dozen mappings on this project's VM, more for
//! big processes); a query looks one mapping up (a few µs) and is never stale. On an older
//! kernel the ioctl does not exist (`ENOTTY`): callers read the text instead.

use std::fs::File;
use std::os::fd::AsRawFd;

/// `struct procmap_query` of <linux/fs.h>.
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// `_IOWR('f', 17, struct procmap_query)`.
const PROCMAP_QUERY: u64 =
    3 << 30 | (std::mem::size_of::<ProcmapQuery>() as u64) << 16 | 0x66 << 8 | 17;
const _: () = assert!(PROCMAP_QUERY == 0xc068_6611);

/// What the kernel said about an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Covering {
    /// The mapping `start..end` holds it.
    Mapping { start: u64, end: u64 },
    /// No mapping does.
    Nothing,
    /// The kernel cannot say (no such ioctl, or the process is gone): read the maps text.
    Unknown,
}

/// A process's maps file, kept open for queries.
pub(crate) struct VmaQuery {
    maps: File,
}

impl VmaQuery {
    /// Opens the maps of process `pid` (through a live thread when its main thread has exited,
    /// see `proc_dir`); `None` when it cannot be opened.
    pub(crate) fn open(pid: i32) -> Option<VmaQuery> {
        let maps = File::open(format!("{}/maps", super::proc_dir::dir(pid))).ok()?;
        Some(VmaQuery { maps })
    }

    /// The mapping holding `addr`.
    pub(crate) fn covering(&self, addr: u64) -> Covering {
        let mut q = ProcmapQuery {
            size: std::mem::size_of::<ProcmapQuery>() as u64,
            query_addr: addr,
            ..ProcmapQuery::default()
        };
        // SAFETY: PROCMAP_QUERY reads and writes the one `struct procmap_query` it is given,
        // whose `size` says how long it is; no name or build-id buffer is asked for (their
        // sizes are 0), so the kernel writes nowhere else.
        let r = unsafe {
            libc::ioctl(
                self.maps.as_raw_fd(),
                PROCMAP_QUERY as libc::c_ulong,
                &mut q as *mut ProcmapQuery,
            )
        };
        if r == 0 {
            return Covering::Mapping {
                start: q.vma_start,
                end: q.vma_end,
            };
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOENT) => Covering::Nothing,
            _ => Covering::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a kernel with the ioctl, the mapping of a local variable is the one the maps text
    /// lists for it; an address below every mapping is in none. (Older kernels: Unknown.)
    #[test]
    fn a_stack_address_is_in_the_mapping_the_text_lists() {
        let pid = std::process::id() as i32;
        let q = VmaQuery::open(pid).expect("own maps");
        let local = 0u64;
        let addr = &local as *const u64 as u64;
        match q.covering(addr) {
            Covering::Unknown => return, // an older kernel
            Covering::Nothing => panic!("no mapping for a stack address"),
            Covering::Mapping { start, end } => {
                let text = std::fs::read_to_string("/proc/self/maps").unwrap();
                let listed = text.lines().any(|l| {
                    let range = l.split_whitespace().next().unwrap();
                    let (a, b) = range.split_once('-').unwrap();
                    u64::from_str_radix(a, 16).unwrap() == start
                        && u64::from_str_radix(b, 16).unwrap() == end
                });
                assert!(start <= addr && addr < end && listed, "{start:#x}-{end:#x}");
            }
        }
        assert_eq!(q.covering(8), Covering::Nothing);
    }
}
