//! lp-core's consistency verdict for the kernel's tasks, one task at a time (the C side walks
//! the task list inside `stop_machine` and asks for each; no buffer for all tasks is needed).

use lp_core::consistency::{check, CodeRange, ThreadStack, Verdict};

/// `[start, end)` as the C side lays it out (`struct lp_range`).
#[repr(C)]
pub struct LpRange {
    start: u64,
    end: u64,
}

/// Upper bound on the ranges of one switch (the C side has at most 64 functions per patch).
const MAX_RANGES: usize = 64;

/// `0` when task `tid` (ip `ip`, `n` return addresses innermost first) is in none of the
/// ranges; `1` when it is, with the range index and the address found written out.
///
/// # Safety
/// `return_addresses` points to `n` u64s, `ranges` to `nranges` ranges, the two out pointers
/// are writable.
#[no_mangle]
pub unsafe extern "C" fn lp_rs_check_task(
    tid: u32,
    ip: u64,
    return_addresses: *const u64,
    n: usize,
    ranges: *const LpRange,
    nranges: usize,
    busy_range: *mut usize,
    busy_addr: *mut u64,
) -> i32 {
    let mut code = [CodeRange::new(0, 0); MAX_RANGES];
    let nranges = nranges.min(MAX_RANGES);
    // SAFETY: the caller guarantees the lengths of both arrays.
    let (addrs, given) = unsafe {
        (
            core::slice::from_raw_parts(return_addresses, n),
            core::slice::from_raw_parts(ranges, nranges),
        )
    };
    for (c, r) in code.iter_mut().zip(given) {
        *c = CodeRange::new(r.start, r.end);
    }
    let stack = ThreadStack {
        tid,
        ip,
        return_addresses: addrs,
    };
    match check(&[stack], &code[..nranges]) {
        Verdict::Safe => 0,
        Verdict::Busy(b) => {
            // SAFETY: the caller guarantees both out pointers are writable.
            unsafe {
                *busy_range = b.range;
                *busy_addr = b.addr;
            }
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_one(addrs: &[u64], ranges: &[LpRange]) -> Option<(usize, u64)> {
        let (mut range, mut addr) = (usize::MAX, 0);
        // SAFETY: slices and out pointers are valid for the call.
        let busy = unsafe {
            lp_rs_check_task(
                7,
                0,
                addrs.as_ptr(),
                addrs.len(),
                ranges.as_ptr(),
                ranges.len(),
                &mut range,
                &mut addr,
            )
        };
        (busy == 1).then_some((range, addr))
    }

    #[test]
    fn a_return_address_inside_a_range_is_busy() {
        let ranges = [
            LpRange {
                start: 0x1000,
                end: 0x1100,
            },
            LpRange {
                start: 0x2000,
                end: 0x2040,
            },
        ];
        assert_eq!(
            check_one(&[0x5000, 0x2010, 0x6000], &ranges),
            Some((1, 0x2010))
        );
        assert_eq!(
            check_one(&[0x5000, 0x1100], &ranges),
            None,
            "end is outside"
        );
        assert_eq!(
            check_one(&[], &ranges),
            None,
            "an empty stack (zombie) is idle"
        );
    }
}
