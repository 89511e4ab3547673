//! A plain model of the redirect table (BTreeMap + Vec) and a driver that runs one operation on
//! both the real table and the model and checks they agree. Shared by the property test
//! (lp-core/tests/table_model.rs) and the fuzz target (fuzz/fuzz_targets/table_ops.rs).
//!
//! The model states the rules independently of lp-core's implementation, in the documented
//! order of checks, so a disagreement means one of them is wrong.
#![allow(dead_code)]

use std::collections::BTreeMap;

use lp_core::table::{EntryState, RedirectTable, TableError, Version, MAX_DEPTH};
use lp_core::trap::{decide, TrapDecision};

/// One operation on the table.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Push {
        old: u64,
        resume: u64,
        new: u64,
        patch_id: u32,
    },
    Pop {
        old: u64,
        patch_id: u32,
    },
    SetState {
        old: u64,
        patch_id: u32,
        state: EntryState,
    },
    Lookup {
        old: u64,
    },
}

#[derive(Clone, Debug, PartialEq)]
struct Entry {
    resume: u64,
    versions: Vec<Version>,
    state: EntryState,
}

/// The model: site → (resume, versions oldest first, state of the top).
#[derive(Debug)]
pub struct Model {
    capacity: usize,
    sites: BTreeMap<u64, Entry>,
}

/// What an operation returned, comparable between table and model.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    Unit(Result<(), TableError>),
    Popped(Result<Version, TableError>),
    Looked(Option<(u64, u32, EntryState, usize, u64, Option<Version>)>),
}

impl Model {
    pub fn new(capacity: usize) -> Model {
        Model {
            capacity,
            sites: BTreeMap::new(),
        }
    }

    fn top_check(&self, old: u64, patch_id: u32) -> Result<&Entry, TableError> {
        let e = self.sites.get(&old).ok_or(TableError::NotFound { old })?;
        let top_patch = e.versions.last().unwrap().patch_id;
        if top_patch == patch_id {
            Ok(e)
        } else if e.versions.iter().any(|v| v.patch_id == patch_id) {
            Err(TableError::NotTop {
                old,
                patch_id,
                top_patch,
            })
        } else {
            Err(TableError::NoSuchPatch {
                old,
                patch_id,
                top_patch,
            })
        }
    }

    fn apply(&mut self, op: Op) -> Outcome {
        match op {
            Op::Push {
                old,
                resume,
                new,
                patch_id,
            } => Outcome::Unit(self.push(old, resume, Version::new(new, patch_id))),
            Op::Pop { old, patch_id } => Outcome::Popped(self.pop(old, patch_id)),
            Op::SetState {
                old,
                patch_id,
                state,
            } => Outcome::Unit(self.set_state(old, patch_id, state)),
            Op::Lookup { old } => Outcome::Looked(self.sites.get(&old).map(|e| {
                let top = *e.versions.last().unwrap();
                let below = e.versions.len().checked_sub(2).map(|i| e.versions[i]);
                (
                    top.new,
                    top.patch_id,
                    e.state,
                    e.versions.len(),
                    e.resume,
                    below,
                )
            })),
        }
    }

    fn push(&mut self, old: u64, resume: u64, v: Version) -> Result<(), TableError> {
        let capacity = self.capacity;
        let len = self.sites.len();
        match self.sites.get_mut(&old) {
            None if len >= capacity => Err(TableError::Full { capacity }),
            None => {
                self.sites.insert(
                    old,
                    Entry {
                        resume,
                        versions: vec![v],
                        state: EntryState::Pending,
                    },
                );
                Ok(())
            }
            Some(e) => {
                if e.resume != resume {
                    return Err(TableError::ResumeMismatch {
                        old,
                        recorded: e.resume,
                        given: resume,
                    });
                }
                if e.versions.iter().any(|x| x.patch_id == v.patch_id) {
                    return Err(TableError::DuplicatePatch {
                        old,
                        patch_id: v.patch_id,
                    });
                }
                if e.state != EntryState::Active {
                    return Err(TableError::InTransition {
                        old,
                        top_patch: e.versions.last().unwrap().patch_id,
                        state: e.state,
                    });
                }
                if e.versions.len() >= MAX_DEPTH {
                    return Err(TableError::StackFull {
                        old,
                        max: MAX_DEPTH,
                    });
                }
                e.versions.push(v);
                e.state = EntryState::Pending;
                Ok(())
            }
        }
    }

    fn set_state(&mut self, old: u64, patch_id: u32, to: EntryState) -> Result<(), TableError> {
        use EntryState::*;
        let from = self.top_check(old, patch_id)?.state;
        let allowed = from == to
            || matches!(
                (from, to),
                (Pending, Active)
                    | (Pending, Reverting)
                    | (Active, Reverting)
                    | (Reverting, Active)
            );
        if !allowed {
            return Err(TableError::BadTransition {
                old,
                patch_id,
                from,
                to,
            });
        }
        self.sites.get_mut(&old).unwrap().state = to;
        Ok(())
    }

    fn pop(&mut self, old: u64, patch_id: u32) -> Result<Version, TableError> {
        if self.top_check(old, patch_id)?.state == EntryState::Active {
            return Err(TableError::StillActive { old, patch_id });
        }
        let e = self.sites.get_mut(&old).unwrap();
        let v = e.versions.pop().unwrap();
        if e.versions.is_empty() {
            self.sites.remove(&old);
        } else {
            e.state = EntryState::Active;
        }
        Ok(v)
    }

    /// The trap decision the model expects at `addr`.
    fn decision(&self, addr: u64) -> TrapDecision {
        match self.sites.get(&addr) {
            None => TrapDecision::NotOurs,
            Some(e) if e.state == EntryState::Active => {
                TrapDecision::Redirect(e.versions.last().unwrap().new)
            }
            Some(e) if e.versions.len() >= 2 => {
                TrapDecision::Redirect(e.versions[e.versions.len() - 2].new)
            }
            Some(e) => TrapDecision::Resume(e.resume),
        }
    }
}

fn run_on_table(table: &RedirectTable<'_>, op: Op) -> Outcome {
    match op {
        Op::Push {
            old,
            resume,
            new,
            patch_id,
        } => Outcome::Unit(table.push(old, resume, new, patch_id)),
        Op::Pop { old, patch_id } => Outcome::Popped(table.pop(old, patch_id)),
        Op::SetState {
            old,
            patch_id,
            state,
        } => Outcome::Unit(table.set_state(old, patch_id, state)),
        Op::Lookup { old } => Outcome::Looked(
            table
                .lookup(old)
                .map(|r| (r.new, r.patch_id, r.state, r.depth, r.resume, r.below)),
        ),
    }
}

/// Run `op` on both; then compare the whole table with the model (contents, order, and the trap
/// decision at every site and at `probe`). Returns what the operation returned (Debug text), or
/// a description of the first disagreement.
pub fn step(
    table: &RedirectTable<'_>,
    model: &mut Model,
    op: Op,
    probe: u64,
) -> Result<String, String> {
    let got = run_on_table(table, op);
    let want = model.apply(op);
    if got != want {
        return Err(format!("{op:?}: table returned {got:?}, model {want:?}"));
    }
    let contents: Vec<(u64, Entry)> = table.read(|snap| {
        snap.iter()
            .map(|s| {
                (
                    s.old(),
                    Entry {
                        resume: s.resume(),
                        versions: s.versions().to_vec(),
                        state: s.state(),
                    },
                )
            })
            .collect()
    });
    let expected: Vec<(u64, Entry)> = model.sites.iter().map(|(k, e)| (*k, e.clone())).collect();
    if contents != expected {
        return Err(format!(
            "after {op:?}: table holds {contents:?}, model {expected:?}"
        ));
    }
    if table.len() > table.capacity() {
        return Err(format!(
            "len {} over capacity {}",
            table.len(),
            table.capacity()
        ));
    }
    for addr in model.sites.keys().copied().chain([probe]) {
        let (got, want) = (decide(table, addr), model.decision(addr));
        if got != want {
            return Err(format!(
                "after {op:?}: decision at {addr:#x} is {got:?}, model says {want:?}"
            ));
        }
    }
    Ok(format!("{got:?}"))
}
