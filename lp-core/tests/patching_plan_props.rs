//! Properties of write plans: each step applied to a byte buffer gives exactly the expected
//! bytes; after step 1 only the first byte differs; revert after apply restores the original;
//! and every intermediate state decodes, from the patch address, to the old instructions, a lone
//! `int3`, or the new jump — never anything else.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic};
use lp_core::jump::Jump;
use lp_core::plan::{plan_apply, plan_revert, plan_write, Step, WritePlan, MAX_STEPS};
use lp_core::site::{validate_site, Site, ENDBR64, INT3};
use proptest::prelude::*;

/// Runs `plan` on `mem` (whose first byte is at `base`), returning every state after a write.
fn run(plan: &WritePlan, base: u64, mem: &mut [u8]) -> Vec<Vec<u8>> {
    let mut states = vec![mem.to_vec()];
    for step in plan.steps() {
        assert!(step.apply(base, mem), "step outside the buffer");
        if matches!(step, Step::Write { .. }) {
            states.push(mem.to_vec());
        }
    }
    states
}

/// The protocol's shape: write, sync, write, sync, ... at most three writes, always synced.
fn assert_shape(plan: &WritePlan) {
    let steps = plan.steps();
    assert!(steps.len() <= MAX_STEPS);
    assert_eq!(steps.len() % 2, 0);
    for pair in steps.chunks(2) {
        assert!(matches!(pair[0], Step::Write { .. }));
        assert_eq!(pair[1], Step::Sync);
    }
}

/// Every intermediate state is the old bytes, the new bytes, or has int3 in the first byte;
/// the tail changes only behind an int3; after the first write only the first byte differs.
fn assert_states(plan: &WritePlan, off: usize, states: &[Vec<u8>]) {
    let old = plan.expected();
    let new = plan.result();
    let n = plan.len();
    for (i, s) in states.iter().enumerate() {
        let site = &s[off..off + n];
        assert!(
            site == old || site == new || site[0] == INT3,
            "state {i} is neither old, new, nor int3-guarded: {site:02x?}"
        );
        if i > 0 {
            let prev = &states[i - 1][off..off + n];
            if prev[1..] != site[1..] {
                assert_eq!(prev[0], INT3, "tail written without an int3 in front");
                assert_eq!(site[0], INT3, "tail written without an int3 in front");
            }
        }
    }
    if old[0] != INT3 && old != new {
        let first = &states[1][off..off + n];
        assert_eq!(first[0], INT3);
        assert_eq!(
            first[1..],
            old[1..],
            "after step 1 only the first byte differs"
        );
    }
    assert_eq!(&states.last().unwrap()[off..off + n], new);
}

fn decode_first(bytes: &[u8], ip: u64) -> Instruction {
    Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE).decode()
}

/// A pool of real instruction encodings that compilers put at function entries.
fn instruction() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(vec![0x55]),                                                      // push rbp
        Just(vec![0x53]),                                                      // push rbx
        Just(vec![0x48, 0x89, 0xe5]),                                          // mov rbp,rsp
        Just(vec![0x48, 0x83, 0xec, 0x20]),                                    // sub rsp,0x20
        Just(vec![0x31, 0xc0]),                                                // xor eax,eax
        Just(vec![0x89, 0xfa]),                                                // mov edx,edi
        Just(vec![0x8d, 0x04, 0x37]),                                          // lea eax,[rdi+rsi]
        Just(vec![0x90]),                                                      // nop
        Just(vec![0x0f, 0x1f, 0x40, 0x00]),                                    // nopl 0(rax)
        Just(vec![0x85, 0xff]),                                                // test edi,edi
        Just(vec![0x48, 0x83, 0xff, 0x01]),                                    // cmp rdi,1
        any::<[u8; 4]>().prop_map(|imm| [&[0xb8][..], &imm].concat()),         // mov eax,imm32
        any::<[u8; 4]>().prop_map(|d| [&[0x48, 0x8b, 0x05][..], &d].concat()), // mov rax,[rip+d]
        any::<i8>().prop_map(|r| vec![0x74, r as u8]),                         // je rel8
        any::<i32>().prop_map(|r| [&[0xe8][..], &r.to_le_bytes()].concat()),   // call rel32
    ]
}

prop_compose! {
    fn function()(endbr in any::<bool>(), pad in 0usize..3,
                  body in proptest::collection::vec(instruction(), 1..10)) -> Vec<u8> {
        let mut code = Vec::new();
        if endbr { code.extend_from_slice(&ENDBR64); }
        code.extend(std::iter::repeat_n(0x90, pad));
        for i in body { code.extend(i); }
        code.push(0xc3);
        code
    }
}

/// A site for the jump to `target` (validated for the jump length that target needs).
fn site_for(code: &[u8], entry: u64, target: u64) -> Option<Site> {
    let probe = validate_site(code, entry, 5).ok()?;
    let len = Jump::to(probe.patch_addr, target).len();
    validate_site(code, entry, len).ok()
}

/// Check that the first instruction at the patch address in `state` is allowed.
/// `before` is the whole buffer before the plan ran, `old` the plan's expected bytes.
fn assert_decodes_sanely(
    state: &[u8],
    before: &[u8],
    site: &Site,
    old: &[u8],
    new: &Jump,
    target: u64,
) {
    let off = site.patch_offset();
    let at = &state[off..];
    let got = decode_first(at, site.patch_addr);
    if &at[..old.len()] == old {
        let want = decode_first(&before[off..], site.patch_addr);
        assert_eq!(got.code(), want.code());
        assert_eq!(got.len(), want.len());
    } else if at[0] == INT3 {
        assert_eq!(got.mnemonic(), Mnemonic::Int3);
        assert_eq!(got.len(), 1);
    } else {
        assert_eq!(
            &at[..new.len()],
            new.as_bytes(),
            "a state that is none of the three"
        );
        assert_eq!(got.mnemonic(), Mnemonic::Jmp);
        if new.is_absolute() {
            assert_eq!(got.code(), Code::Jmp_rm64);
            assert!(got.is_ip_rel_memory_operand());
            assert_eq!(got.ip_rel_memory_address(), site.patch_addr + 6);
            let mut abs = [0u8; 8];
            abs.copy_from_slice(&at[6..14]);
            assert_eq!(u64::from_le_bytes(abs), target);
        } else {
            assert_eq!(got.near_branch_target(), target);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn any_write_plan_keeps_the_protocol(addr in any::<u64>(),
                                          pair in (1usize..=16).prop_flat_map(|n| (
                                              proptest::collection::vec(prop_oneof![Just(0xccu8), any::<u8>()], n),
                                              proptest::collection::vec(prop_oneof![Just(0xccu8), any::<u8>()], n))))
    {
        let (old, new) = pair;
        let addr = addr.min(u64::MAX - 16);
        let plan = plan_write(addr, &old, &new).unwrap();
        assert_shape(&plan);
        let mut mem = old.clone();
        let states = run(&plan, addr, &mut mem);
        assert_states(&plan, 0, &states);
        prop_assert_eq!(&mem, &new);
        let revert = plan_revert(&plan);
        assert_shape(&revert);
        let states = run(&revert, addr, &mut mem);
        assert_states(&revert, 0, &states);
        prop_assert_eq!(mem, old);
    }

    #[test]
    fn real_entries_patch_revert_and_stack(code in function(),
                                          entry in prop_oneof![0x40_0000u64..0x50_0000, any::<u64>()],
                                          t1 in prop_oneof![0x40_0000u64..0x60_0000, any::<u64>()],
                                          t2 in prop_oneof![0x40_0000u64..0x60_0000, any::<u64>()])
    {
        let entry = entry.min(u64::MAX - 4096);
        let Some(site) = site_for(&code, entry, t1) else { return Ok(()) };
        let off = site.patch_offset();
        let original = code.clone();
        let mut mem = code.clone();

        // apply
        let current = &mem[off..off + site.displaced_len];
        let p1 = plan_apply(&site, current, t1).unwrap();
        assert_shape(&p1);
        let j1 = Jump::to(site.patch_addr, t1);
        let states = run(&p1, entry, &mut mem);
        assert_states(&p1, off, &states);
        for s in &states {
            // nothing outside the jump's bytes ever changes
            prop_assert_eq!(&s[..off], &original[..off]);
            prop_assert_eq!(&s[off + j1.len()..], &original[off + j1.len()..]);
            assert_decodes_sanely(s, &original, &site, p1.expected(), &j1, t1);
        }
        let after1 = mem.clone();

        // stack a second patch on top (when its jump fits the same site)
        let current = &mem[off..off + site.displaced_len];
        if let Ok(p2) = plan_apply(&site, current, t2) {
            let j2 = Jump::to(site.patch_addr, t2);
            prop_assert_eq!(p2.expected(), &after1[off..off + p2.len()]);
            prop_assert!(p2.len() == j2.len() || p2.len() == j1.len());
            let states = run(&p2, entry, &mut mem);
            assert_states(&p2, off, &states);
            for s in &states {
                assert_decodes_sanely(s, &after1, &site, p2.expected(), &j2, t2);
            }
            let r2 = plan_revert(&p2);
            let states = run(&r2, entry, &mut mem);
            assert_states(&r2, off, &states);
            prop_assert_eq!(&mem, &after1);
        }

        // revert restores the original exactly, through sane states
        let r1 = plan_revert(&p1);
        let states = run(&r1, entry, &mut mem);
        assert_states(&r1, off, &states);
        for s in &states {
            // the same three-way classification holds on the way back
            assert_decodes_sanely(s, &original, &site, p1.expected(), &j1, t1);
        }
        prop_assert_eq!(mem, original);
    }
}
