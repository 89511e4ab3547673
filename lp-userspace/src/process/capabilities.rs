//! The calling thread's CAP_SYS_NICE, read (and, for tests, taken out) through capget/capset.
//! Linux keeps capabilities per thread.

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`: version 3 has two, 32 capabilities each.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`.
const VERSION_3: u32 = 0x2008_0522;
/// CAP_SYS_NICE, bit 23 of the first word.
const SYS_NICE: u32 = 1 << 23;

/// The calling thread's capability sets (pid 0), or None when capget fails.
fn get() -> Option<(Header, [Data; 2])> {
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget reads the header and writes two Data records (version 3's layout), both
    // of which live through the call.
    let got = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    (got == 0).then_some((header, data))
}

/// Whether CAP_SYS_NICE is in the calling thread's effective set.
pub(crate) fn has_sys_nice() -> bool {
    get().is_some_and(|(_, data)| data[0].effective & SYS_NICE != 0)
}

/// Takes CAP_SYS_NICE out of the calling thread's effective set (the process's other threads
/// keep theirs); false when the kernel refused.
#[cfg(test)]
pub(crate) fn drop_sys_nice() -> bool {
    let Some((mut header, mut data)) = get() else {
        return false;
    };
    data[0].effective &= !SYS_NICE;
    // SAFETY: capset reads the header and two Data records (version 3's layout), which live
    // through the call.
    unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) == 0 }
}
