//! Arbitrary sequences of table operations, run on the real redirect table and on the BTreeMap
//! model shared with lp-core's property test: results, errors, full contents and trap decisions
//! must agree after every operation, and nothing may panic.
#![no_main]

#[path = "../../lp-core/tests/table_support/model.rs"]
mod model;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use lp_core::table::{EntryState, RedirectTable, Slot};
use model::{step, Model, Op};

/// Site addresses are drawn from a few values (so operations collide) or taken raw.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Known(u8),
    Raw(u64),
}

impl Addr {
    fn get(self) -> u64 {
        const KNOWN: [u64; 6] = [
            0,
            0x1000,
            0x1001,
            0x40_0000,
            0xffff_ffff_8100_0000,
            u64::MAX,
        ];
        match self {
            Addr::Known(i) => KNOWN[usize::from(i) % KNOWN.len()],
            Addr::Raw(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum State {
    Pending,
    Active,
    Reverting,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum FuzzOp {
    Push {
        old: Addr,
        wrong_resume: bool,
        new: u64,
        patch: u8,
    },
    Pop {
        old: Addr,
        patch: u8,
    },
    SetState {
        old: Addr,
        patch: u8,
        state: State,
    },
    Lookup {
        old: Addr,
    },
    /// Push then commit: reaches deep stacks (and `StackFull`) in few steps.
    PushActive {
        old: Addr,
        new: u64,
        patch: u8,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    capacity_a: u8,
    capacity_b: u8,
    probe: u64,
    ops: Vec<FuzzOp>,
}

fn ops(f: FuzzOp) -> Vec<Op> {
    // a small patch-id space (more ids than MAX_DEPTH) makes stacks, duplicates and NotTop common
    let id = |p: u8| u32::from(p % 12);
    let resume_of = |old: u64| old.wrapping_add(0x10_0000);
    match f {
        FuzzOp::Push {
            old,
            wrong_resume,
            new,
            patch,
        } => {
            let old = old.get();
            vec![Op::Push {
                old,
                resume: resume_of(old) ^ u64::from(wrong_resume),
                new,
                patch_id: id(patch),
            }]
        }
        FuzzOp::Pop { old, patch } => vec![Op::Pop {
            old: old.get(),
            patch_id: id(patch),
        }],
        FuzzOp::SetState { old, patch, state } => vec![Op::SetState {
            old: old.get(),
            patch_id: id(patch),
            state: match state {
                State::Pending => EntryState::Pending,
                State::Active => EntryState::Active,
                State::Reverting => EntryState::Reverting,
            },
        }],
        FuzzOp::Lookup { old } => vec![Op::Lookup { old: old.get() }],
        FuzzOp::PushActive { old, new, patch } => {
            let old = old.get();
            vec![
                Op::Push {
                    old,
                    resume: resume_of(old),
                    new,
                    patch_id: id(patch),
                },
                Op::SetState {
                    old,
                    patch_id: id(patch),
                    state: EntryState::Active,
                },
            ]
        }
    }
}

fuzz_target!(|input: Input| {
    let (ca, cb) = (
        usize::from(input.capacity_a % 9),
        usize::from(input.capacity_b % 9),
    );
    let (mut a, mut b) = (vec![Slot::EMPTY; ca], vec![Slot::EMPTY; cb]);
    let table = RedirectTable::new(&mut a, &mut b);
    let mut model = Model::new(ca.min(cb));
    for op in input.ops.into_iter().take(512).flat_map(ops) {
        if let Err(e) = step(&table, &mut model, op, input.probe) {
            panic!("table and model disagree: {e}");
        }
    }
});
