"""Read-only access to lp-core: patch-site validation and the write plan.

For scripts that inspect a binary before patching it. Nothing here touches a process: you hand
in bytes and addresses, you get lp-core's verdict back — the same code the CLI and the kernel
module run.

>>> from livepatch import core
>>> code = bytes.fromhex("554889e531c05dc3")   # push rbp; mov rbp,rsp; xor eax,eax; pop rbp; ret
>>> site = core.validate_site(code, 0x401000)
>>> hex(site.patch_addr), site.displaced_len
('0x401000', 6)
>>> plan = core.plan_apply(site, code[:site.displaced_len], 0x500000)
>>> [step.kind for step in plan]
['write', 'sync', 'write', 'sync', 'write', 'sync']
"""

from typing import FrozenSet, Union

from . import _livepatch
from ._errors import PlanError, SiteError
from ._livepatch import Site, Step, WritePlan, plan_apply, plan_revert, plan_write, validate_site

#: Length of the ``jmp rel32`` redirect (the default ``jump_len`` of :func:`validate_site`).
REL32_JUMP_LEN: int = _livepatch.REL32_JUMP_LEN
#: Length of the absolute redirect used when the target is out of ±2 GiB reach.
ABS_JUMP_LEN: int = _livepatch.ABS_JUMP_LEN

#: Registers a SysV x86-64 callee may change without restoring them (lower-case names).
SYSV_CALLER_SAVED: FrozenSet[str] = frozenset(_livepatch.sysv_caller_saved())


def clobbered_registers(code: Union[bytes, bytearray], address: int) -> FrozenSet[str]:
    """The registers the function whose bytes ``code`` start at ``address`` may leave changed
    for its caller, as lower-case names (``"rax"``, ``"flags"``, ``"xmm0"``...).

    lp-core follows the function's own control flow (a register saved and restored does not
    count; a call elsewhere counts as every caller-saved register). Callers compiled with gcc's
    ``-fipa-ra`` may rely on every register *not* in this set surviving the call: a replacement
    must preserve them too (``livepatch.apply`` adds a register-saving thunk when it does not).
    Raises :class:`SiteError` when the bytes cannot be decoded.
    """
    return frozenset(_livepatch.clobbered_registers(bytes(code), address))



def written_registers(code: Union[bytes, bytearray], address: int) -> FrozenSet[str]:
    """The registers the function's own reachable instructions write, calls' effects left out:
    a *lower* bound of the clobber set gcc's ``-fipa-ra`` recorded for it. Use it for the
    function being replaced and :func:`clobbered_registers` (an upper bound) for the new one.
    """
    return frozenset(_livepatch.written_registers(bytes(code), address))


def registers_to_preserve(old_code: Union[bytes, bytearray], old_address: int,
                          new_code: Union[bytes, bytearray], new_address: int) -> FrozenSet[str]:
    """The caller-saved registers a thunk around the replacement must save and restore so that
    callers of the old function compiled with ``-fipa-ra`` keep what they rely on:
    ``(clobbered_registers(new) - written_registers(old)) & SYSV_CALLER_SAVED``. Empty: the new
    function can be jumped to directly.
    """
    return frozenset(_livepatch.registers_to_preserve(bytes(old_code), old_address,
                                                      bytes(new_code), new_address))


__all__ = [
    "Site",
    "Step",
    "WritePlan",
    "SiteError",
    "PlanError",
    "validate_site",
    "plan_apply",
    "plan_write",
    "plan_revert",
    "clobbered_registers",
    "written_registers",
    "registers_to_preserve",
    "SYSV_CALLER_SAVED",
    "REL32_JUMP_LEN",
    "ABS_JUMP_LEN",
]
