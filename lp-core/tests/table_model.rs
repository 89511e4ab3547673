//! Property: random sequences of push / pop / set_state / lookup on the real table agree, op by
//! op, with a BTreeMap model (results, errors, full contents, trap decisions).

#[path = "table_support/model.rs"]
mod model;

use lp_core::table::{EntryState, RedirectTable, Slot};
use model::{step, Model, Op};
use proptest::prelude::*;

const SITES: [u64; 6] = [
    0x1000,
    0x1010,
    0x2000,
    0x7fff_0000,
    0xffff_ffff_8100_0000,
    u64::MAX,
];

fn resume_of(old: u64) -> u64 {
    old.wrapping_add(0x10_0000)
}

fn state() -> impl Strategy<Value = EntryState> {
    prop_oneof![
        Just(EntryState::Pending),
        Just(EntryState::Active),
        Just(EntryState::Reverting)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let site = prop::sample::select(&SITES[..]);
    let patch = 0u32..11; // more ids than MAX_DEPTH, so stacks fill up
    prop_oneof![
        4 => (site.clone(), patch.clone(), any::<u64>(), prop::bool::weighted(0.05)).prop_map(
            |(old, patch_id, new, wrong_resume)| Op::Push {
                old,
                resume: if wrong_resume { resume_of(old) ^ 1 } else { resume_of(old) },
                new,
                patch_id,
            }
        ),
        2 => (site.clone(), patch.clone()).prop_map(|(old, patch_id)| Op::Pop { old, patch_id }),
        4 => (site.clone(), patch, state())
            .prop_map(|(old, patch_id, state)| Op::SetState { old, patch_id, state }),
        1 => site.prop_map(|old| Op::Lookup { old }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn table_agrees_with_model(
        capacity in 0usize..6,
        ops in prop::collection::vec(op(), 1..200),
        probe in any::<u64>(),
    ) {
        let (mut a, mut b) = (vec![Slot::EMPTY; capacity], vec![Slot::EMPTY; capacity + 3]);
        let table = RedirectTable::new(&mut a, &mut b);
        prop_assert_eq!(table.capacity(), capacity);
        let mut model = Model::new(capacity);
        for op in ops {
            if let Err(e) = step(&table, &mut model, op, probe) {
                return Err(TestCaseError::fail(e));
            }
        }
    }
}

/// A deterministic walk through every error path: the table and the model agree on each, and
/// each produces the error named.
#[test]
fn every_error_path_is_reachable() {
    let (mut a, mut b) = ([Slot::EMPTY; 2], [Slot::EMPTY; 2]);
    let t = RedirectTable::new(&mut a, &mut b);
    let mut m = Model::new(2);
    let push = |old: u64, id: u32| Op::Push {
        old,
        resume: resume_of(old),
        new: old + 0x100 + u64::from(id),
        patch_id: id,
    };
    let set = |old, patch_id, state| Op::SetState {
        old,
        patch_id,
        state,
    };
    let pop = |old, patch_id| Op::Pop { old, patch_id };
    let mut ops = vec![
        (push(0x1000, 1), "Ok"),
        (push(0x1000, 2), "InTransition"),
        (set(0x1000, 1, EntryState::Active), "Ok"),
        (pop(0x1000, 1), "StillActive"),
        (push(0x1000, 1), "DuplicatePatch"),
    ];
    for id in 2..=8 {
        ops.push((push(0x1000, id), "Ok"));
        ops.push((set(0x1000, id, EntryState::Active), "Ok"));
    }
    ops.extend([
        (push(0x1000, 9), "StackFull"),
        (set(0x1000, 3, EntryState::Reverting), "NotTop"),
        (pop(0x1000, 3), "NotTop"),
        (set(0x1000, 42, EntryState::Reverting), "NoSuchPatch"),
        (set(0x1000, 8, EntryState::Pending), "BadTransition"),
        (
            Op::Push {
                old: 0x1000,
                resume: 1,
                new: 2,
                patch_id: 9,
            },
            "ResumeMismatch",
        ),
        (push(0x2000, 1), "Ok"),
        (push(0x3000, 1), "Full"),
        (pop(0x4000, 1), "NotFound"),
        (set(0x1000, 8, EntryState::Reverting), "Ok"),
        (pop(0x1000, 8), "Ok(Version"),
        (Op::Lookup { old: 0x1000 }, "Some((4359, 7, Active, 7,"),
    ]);
    for (op, expected) in ops {
        let got = step(&t, &mut m, op, 0x1000).unwrap();
        assert!(
            got.contains(expected),
            "{op:?} returned {got}, expected {expected}"
        );
    }
}
