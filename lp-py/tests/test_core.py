"""livepatch.core on real gcc output: site validation and write plans."""

from pathlib import Path

import livepatch
import pytest
from conftest import gcc, function_code
from livepatch import core

SOURCE = r"""
int plain(int a, int b) { int c = a * b; if (c > 100) c -= a; return c + b; }
int tiny(void) { return 0; }
long walk(long *p) { long n = 0; do { n++; p = (long *)*p; } while (p); return n; }
"""


@pytest.fixture(scope="module")
def objects(tmp_path_factory, have_gcc):
    d = tmp_path_factory.mktemp("core")
    src = d / "funcs.c"
    src.write_text(SOURCE)
    return {
        "O0": gcc(d / "o0.o", "-c", "-O0", "-fcf-protection=none", str(src)),
        "Os": gcc(d / "os.o", "-c", "-Os", "-fcf-protection=none", str(src)),
        "O2": gcc(d / "o2.o", "-c", "-O2", "-fcf-protection=none", str(src)),
        "cet": gcc(d / "cet.o", "-c", "-O0", "-fcf-protection=full", str(src)),
        "pad": gcc(d / "pad.o", "-c", "-O2", "-fcf-protection=none",
                   "-fpatchable-function-entry=16", str(src)),
    }


def test_plain_function_patched_at_entry(objects):
    code, _ = function_code(objects["O0"], "plain")
    site = core.validate_site(code, 0x401000)
    assert site.entry == site.patch_addr == 0x401000
    assert not site.endbr64
    assert 5 <= site.displaced_len <= len(code)
    assert site.displaced == code[: site.displaced_len]
    assert site.resume_addr == 0x401000 + site.displaced_len


def test_endbr64_is_kept_and_the_redirect_follows_it(objects):
    code, _ = function_code(objects["cet"], "plain")
    assert code[:4] == bytes.fromhex("f30f1efa")
    site = core.validate_site(code, 0x401000)
    assert site.endbr64
    assert site.patch_offset == 4 and site.patch_addr == 0x401004
    assert site.displaced == code[4 : 4 + site.displaced_len]


def test_patchable_entry_pad_is_reported(objects):
    code, _ = function_code(objects["pad"], "plain")
    site = core.validate_site(code, 0x1000)
    assert site.entry_nops >= 5


def test_too_short_function_is_refused_with_the_reason(objects):
    code, _ = function_code(objects["O2"], "tiny")  # xor eax,eax; ret
    assert len(code) < 5
    with pytest.raises(core.SiteError, match="too short") as err:
        core.validate_site(code, 0x1000)
    assert isinstance(err.value, livepatch.Error)
    assert isinstance(err.value, livepatch.RefusedError)
    assert "\n" not in str(err.value)


def test_loop_branching_into_the_patched_bytes_is_refused(objects):
    # gcc -Os puts walk's loop head 2 bytes after the entry: a jump there would land mid-jmp.
    code, _ = function_code(objects["Os"], "walk")
    with pytest.raises(core.SiteError, match="inside the bytes the redirect overwrites"):
        core.validate_site(code, 0x2000)
    # The 14-byte absolute form is refused as well; a different address changes nothing.
    with pytest.raises(core.SiteError):
        core.validate_site(code, 0x7F0000001000, jump_len=core.ABS_JUMP_LEN)


def test_plan_apply_then_revert_round_trips_real_bytes(objects):
    code, _ = function_code(objects["O0"], "plain")
    entry = 0x401000
    site = core.validate_site(code, entry)
    current = code[: site.displaced_len]
    plan = core.plan_apply(site, current, 0x500000)
    assert plan.addr == site.patch_addr
    assert plan.expected == current[: len(plan.result)]
    # jmp rel32 to the target
    assert plan.result[0] == 0xE9
    rel = int.from_bytes(plan.result[1:5], "little", signed=True)
    assert entry + 5 + rel == 0x500000
    # The protocol: int3 first, syncs between, the first byte last.
    kinds = [s.kind for s in plan]
    assert kinds == ["write", "sync", "write", "sync", "write", "sync"]
    assert plan.steps[0].data == b"\xcc" and plan.steps[0].addr == entry
    assert plan.steps[4].data == plan.result[:1]
    assert all(s.addr is None and s.data is None for s in plan if s.kind == "sync")

    memory = bytearray(code)
    for step in plan:
        if step.kind == "write":
            off = step.addr - entry
            memory[off : off + len(step.data)] = step.data
    assert bytes(memory[: len(plan.result)]) == plan.result
    assert bytes(memory[len(plan.result) :]) == code[len(plan.result) :]

    revert = core.plan_revert(plan)
    assert revert.expected == plan.result and revert.result == plan.expected
    for step in revert:
        if step.kind == "write":
            off = step.addr - entry
            memory[off : off + len(step.data)] = step.data
    assert bytes(memory) == code


def test_stacked_plan_starts_from_the_first_patch_jump(objects):
    code, _ = function_code(objects["O0"], "plain")
    site = core.validate_site(code, 0x401000)
    first = core.plan_apply(site, code[: site.displaced_len], 0x500000)
    second = core.plan_apply(site, first.result, 0x600000)
    assert second.expected == first.result


def test_plan_refuses_bytes_that_are_not_the_original(objects):
    code, _ = function_code(objects["O0"], "plain")
    site = core.validate_site(code, 0x401000)
    foreign = b"\x90" * site.displaced_len
    with pytest.raises(core.PlanError, match="not what the patch was made for"):
        core.plan_apply(site, foreign, 0x500000)


def test_plan_write_rejects_mismatched_lengths():
    with pytest.raises(core.PlanError, match="differ in length"):
        core.plan_write(0x1000, b"\x90\x90", b"\xcc")


def test_jump_lengths_are_lp_cores():
    assert (core.REL32_JUMP_LEN, core.ABS_JUMP_LEN) == (5, 14)


def test_bad_argument_types_raise_type_error_not_crash():
    with pytest.raises(TypeError):
        core.validate_site("not bytes", 0x1000)
    with pytest.raises(OverflowError):
        core.validate_site(b"\x90" * 8, -1)


def test_module_docstring_examples_run():
    import doctest

    failed, attempted = doctest.testmod(core)
    assert attempted > 0 and failed == 0


CLOBBER_SOURCE = r"""
int helper(int);
int add_one(int x) { return x + 1; }
int keeps_rbx(int x) { return helper(x) + x; }
"""


def test_clobbered_registers_of_real_functions(tmp_path, have_gcc):
    src = tmp_path / "clobber.c"
    src.write_text(CLOBBER_SOURCE)
    # Linked (helper stays undefined: a call through the PLT), so calls have their real targets.
    lib = gcc(tmp_path / "libclobber.so", "-shared", "-fPIC", "-O2", "-fcf-protection=none",
              str(src))

    code, addr = function_code(lib, "add_one")  # lea eax,[rdi+1]; ret
    assert core.clobbered_registers(code, addr) == {"rax"}

    # A call elsewhere may change every caller-saved register; rbx is saved and restored.
    code, addr = function_code(lib, "keeps_rbx")
    regs = core.clobbered_registers(code, addr)
    assert regs >= {"rax", "rcx", "rdx", "rsi", "rdi", "r8", "r11", "flags", "xmm0"}
    assert "rbx" not in regs and "rsp" not in regs
    assert regs == core.SYSV_CALLER_SAVED
    assert "rbx" not in core.SYSV_CALLER_SAVED


def test_registers_a_replacement_must_preserve(tmp_path, have_gcc):
    # The -fipa-ra case: the old function only writes eax, so callers may keep values in every
    # other caller-saved register across the call; a replacement that calls out clobbers them.
    src = tmp_path / "preserve.c"
    src.write_text(CLOBBER_SOURCE)
    lib = gcc(tmp_path / "libpreserve.so", "-shared", "-fPIC", "-O2", "-fcf-protection=none",
              str(src))
    old, old_addr = function_code(lib, "add_one")
    new, new_addr = function_code(lib, "keeps_rbx")
    assert core.written_registers(old, old_addr) == {"rax"}
    # keeps_rbx's own instructions write rbx (and eax, and flags), whatever its callee does
    assert {"rax", "rbx"} <= core.written_registers(new, new_addr)
    preserve = core.registers_to_preserve(old, old_addr, new, new_addr)
    assert preserve == core.SYSV_CALLER_SAVED - {"rax"}
    # the other way round nothing needs saving: add_one writes nothing keeps_rbx's callers lack
    assert core.registers_to_preserve(new, new_addr, old, old_addr) == frozenset()


def test_clobber_analysis_of_nothing_is_an_error():
    with pytest.raises(core.SiteError, match="no bytes"):
        core.clobbered_registers(b"", 0x1000)
