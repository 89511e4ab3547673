//! Properties of the consistency check over random threads and (possibly overlapping, empty or
//! inverted) ranges: "safe" means no thread is in the way by the documented rules, and "busy"
//! names a real offender, the first one in the documented order.

use lp_core::consistency::{
    check, check_with, Busy, CodeRange, EntryRule, Frame, ThreadStack, Verdict,
};
use proptest::prelude::*;

/// Addresses from a small space so that ranges, ips and return addresses collide often.
fn addr() -> impl Strategy<Value = u64> {
    0u64..512
}

fn ranges() -> impl Strategy<Value = Vec<CodeRange>> {
    prop::collection::vec(
        (addr(), 0u64..96).prop_map(|(s, len)| CodeRange::new(s, s + len)),
        0..5,
    )
}

fn stacks() -> impl Strategy<Value = Vec<(u64, Vec<u64>)>> {
    prop::collection::vec((addr(), prop::collection::vec(addr(), 0..6)), 0..6)
}

fn ip_busy(ip: u64, r: &CodeRange, rule: EntryRule) -> bool {
    r.contains(ip) && !(rule == EntryRule::SafeWhenStopped && ip == r.start)
}

/// Is this thread clean: its ip (and return addresses before index `upto`) in no range?
fn clean(t: &ThreadStack<'_>, ranges: &[CodeRange], rule: EntryRule, upto: usize) -> bool {
    ranges.iter().all(|r| !ip_busy(t.ip, r, rule))
        && t.return_addresses[..upto]
            .iter()
            .all(|&a| ranges.iter().all(|r| !r.contains(a)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn verdict_matches_the_rules(raw in stacks(), ranges in ranges(), relaxed in any::<bool>()) {
        let rule = if relaxed { EntryRule::SafeWhenStopped } else { EntryRule::Busy };
        let threads: Vec<ThreadStack<'_>> = raw
            .iter()
            .enumerate()
            .map(|(i, (ip, rets))| ThreadStack { tid: 100 + i as u32, ip: *ip, return_addresses: rets })
            .collect();
        match check_with(&threads, &ranges, rule) {
            Verdict::Safe => {
                for t in &threads {
                    prop_assert!(clean(t, &ranges, rule, t.return_addresses.len()), "{t:?} is in the way");
                }
            }
            Verdict::Busy(Busy { tid, range, addr, frame }) => {
                let k = (tid - 100) as usize;
                let t = &threads[k];
                let r = ranges[range];
                for earlier in &threads[..k] {
                    prop_assert!(clean(earlier, &ranges, rule, earlier.return_addresses.len()));
                }
                match frame {
                    Frame::Ip => {
                        prop_assert_eq!(addr, t.ip);
                        prop_assert!(ip_busy(addr, &r, rule));
                    }
                    Frame::Return(i) => {
                        prop_assert_eq!(addr, t.return_addresses[i]);
                        prop_assert!(r.contains(addr));
                        prop_assert!(clean(t, &ranges, rule, i), "an earlier frame of {t:?} was busy");
                    }
                }
            }
        }
        // relaxing the entry rule never makes a safe answer busy
        if check(&threads, &ranges).is_safe() {
            prop_assert!(check_with(&threads, &ranges, EntryRule::SafeWhenStopped).is_safe());
        }
    }
}
