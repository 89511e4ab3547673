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

from ._errors import PlanError, SiteError
from ._livepatch import Site, Step, WritePlan, plan_apply, plan_revert, plan_write, validate_site

#: Length of the ``jmp rel32`` redirect (the default ``jump_len`` of :func:`validate_site`).
REL32_JUMP_LEN = 5
#: Length of the absolute redirect used when the target is out of ±2 GiB reach.
ABS_JUMP_LEN = 14

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
    "REL32_JUMP_LEN",
    "ABS_JUMP_LEN",
]
