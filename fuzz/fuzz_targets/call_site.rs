//! Arbitrary bytes and addresses through lp-core's call-site decoder and retargeting planner:
//! nothing may panic; every plan rewrites one branch into the same branch with the new
//! destination through the int3 protocol, and reverting it gives the original bytes back.
//!
//! Input layout: site address and new destination as two little-endian u64s, then the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lp_core::call_site::{decode, encode, plan_retarget, plan_retarget_from};
use lp_core::plan::plan_revert;
use lp_core::site::INT3;

fn word(data: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(s) = data.get(i * 8..i * 8 + 8) {
        b.copy_from_slice(s);
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let (addr, dest) = (word(data, 0), word(data, 1));
    let bytes = data.get(16..).unwrap_or(&[]);
    let decoded = decode(addr, bytes);
    if let Ok(site) = decoded {
        assert_eq!(site.len, bytes.len());
        // what decodes re-encodes to the same bytes
        let again = encode(site.kind, addr, site.target).expect("a decoded target is in reach");
        assert_eq!(&again[..site.len], bytes);
    }
    match plan_retarget(addr, bytes, dest) {
        Ok(plan) => {
            let site = decoded.expect("planned bytes decode");
            assert_eq!(plan.expected(), bytes);
            let after = decode(addr, plan.result()).expect("the result decodes");
            assert_eq!((after.kind, after.target), (site.kind, dest));
            let mut mem = bytes.to_vec();
            for step in plan.steps() {
                assert!(step.apply(addr, &mut mem));
                assert!(mem == bytes || mem == plan.result() || mem[0] == INT3);
            }
            assert_eq!(mem, plan.result());
            for step in plan_revert(&plan).steps() {
                assert!(step.apply(addr, &mut mem));
            }
            assert_eq!(mem, bytes);
            assert!(plan_retarget_from(addr, bytes, site.target, dest).is_ok());
        }
        Err(_) => assert!(decoded.is_err() || encode(decoded.unwrap().kind, addr, dest).is_err()),
    }
});
