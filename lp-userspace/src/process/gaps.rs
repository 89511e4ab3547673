//! Finding free address space near a module, so patch code can reach it (and be reached by)
//! `jmp rel32` / `call rel32` / RIP-relative operands: within ±2 GiB.

const REACH: u64 = (1 << 31) - (1 << 20); // 2 GiB minus a margin for offsets inside the area
const PAGE: u64 = 4096;

/// Returns page-aligned candidate addresses for a mapping of `len` bytes such that the whole
/// mapping is within ±2 GiB of every byte of `[lo, hi)`, nearest first. `maps` is the text of
/// /proc/PID/maps.
pub fn find_free_near(maps: &str, lo: u64, hi: u64, len: u64) -> Vec<u64> {
    let len = len.div_ceil(PAGE) * PAGE;
    let mut used: Vec<(u64, u64)> = maps
        .lines()
        .filter_map(|l| {
            let (s, e) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            ))
        })
        .collect();
    used.sort();
    // Keep well clear of the null page and of the top of the user address space.
    let floor = 1 << 22;
    let ceil = 0x7fff_f000_0000u64;
    let mut candidates = Vec::new();
    let mut prev_end = floor;
    for &(s, e) in used.iter().chain(std::iter::once(&(ceil, ceil))) {
        if s > prev_end && s - prev_end >= len + 2 * PAGE {
            // Try both ends of the gap: just above the previous mapping, just below the next.
            let low = prev_end + PAGE;
            let high = s - len - PAGE;
            for a in [low, high] {
                let end = a + len;
                if hi.saturating_sub(a) <= REACH && end.saturating_sub(lo) <= REACH {
                    candidates.push(a);
                }
            }
        }
        prev_end = prev_end.max(e);
    }
    let mid = lo / 2 + hi / 2;
    candidates.sort_by_key(|&a| a.abs_diff(mid));
    candidates.dedup();
    candidates
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_free_and_in_reach() {
        let maps = "555555554000-555555556000 r-xp 00000000 00:00 0 /bin/x\n\
                    555555556000-555555558000 rw-p 00000000 00:00 0 /bin/x\n\
                    7ffff7d00000-7ffff7f00000 r-xp 00000000 00:00 0 /lib/libc.so\n";
        let c = find_free_near(maps, 0x5555_5555_4000, 0x5555_5555_6000, 0x3000);
        assert!(!c.is_empty());
        for a in c {
            assert!(a + 0x3000 <= 0x5555_5555_4000 || a >= 0x5555_5555_8000 + 4096);
            assert!(a.abs_diff(0x5555_5555_4000) < 1 << 31);
        }
    }
}
