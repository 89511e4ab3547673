"""Type stubs for the native module `livepatch._livepatch` (scripts use `livepatch`)."""

import builtins
import os
from typing import Any, Dict, Iterator, List, Optional, Union, final

__version__: str
REL32_JUMP_LEN: int
ABS_JUMP_LEN: int
__all__ = [
    "__version__",
    "_panic_for_test",
    "REL32_JUMP_LEN",
    "ABS_JUMP_LEN",
    "Site",
    "Step",
    "WritePlan",
    "validate_site",
    "plan_apply",
    "plan_write",
    "plan_revert",
    "clobbered_registers",
    "written_registers",
    "registers_to_preserve",
    "sysv_caller_saved",
    "Patch",
    "Function",
    "pack_patch",
    "apply_patch",
    "revert_patch",
    "status_of",
    "processes_mapping",
]

_Path = Union[str, "os.PathLike[str]"]

@final
class Function:
    """One function a patch replaces."""

    @property
    def old_name(self) -> str:
        """The old function in the target (``name``, ``name@file.c`` or ``name,N``)."""
    @property
    def old_vaddr(self) -> int:
        """Its address in the target file (before the module's load bias)."""
    @property
    def old_size(self) -> int:
        """Its size in bytes."""
    @property
    def old_bytes(self) -> bytes:
        """The bytes it must have in memory before the patch is applied."""
    @property
    def new_name(self) -> str:
        """The replacement's symbol in the patch object."""

@final
class Patch:
    """A live patch for one target module: the new code and the functions it replaces."""

    @staticmethod
    def load(path: _Path) -> "Patch":
        """Reads a patch file. Raises ``PatchFormatError`` for a truncated or corrupted file."""
    @staticmethod
    def from_bytes(data: bytes) -> "Patch":
        """Parses the bytes of a patch file."""
    def save(self, path: _Path) -> None:
        """Writes the patch file to ``path``."""
    def to_bytes(self) -> bytes:
        """The bytes of the patch file."""
    @property
    def id(self) -> str:
        """The patch id: a hash of its content (16 hex digits)."""
    @property
    def target_name(self) -> str:
        """The target module's file name (``app``, ``libfoo.so.1``)."""
    @property
    def target_build_id(self) -> str:
        """The target module's GNU build-id, in hex."""
    @property
    def functions(self) -> List[Function]:
        """The functions the patch replaces."""
    @property
    def object(self) -> bytes:
        """The relocatable object holding the new code."""
    def __eq__(self, value: builtins.object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class Site:
    """A validated patch site: where the redirect goes and what it displaces."""

    @property
    def entry(self) -> int: ...
    @property
    def patch_addr(self) -> int: ...
    @property
    def patch_offset(self) -> int: ...
    @property
    def displaced_len(self) -> int: ...
    @property
    def displaced_count(self) -> int: ...
    @property
    def displaced(self) -> bytes: ...
    @property
    def resume_addr(self) -> int: ...
    @property
    def jump_len(self) -> int: ...
    @property
    def endbr64(self) -> bool: ...
    @property
    def entry_nops(self) -> int: ...
    @property
    def branches_to_patch_addr(self) -> int: ...
    @property
    def relative_in_displaced(self) -> int: ...
    @property
    def indirect_branches(self) -> bool: ...

@final
class Step:
    """One step of a write plan: ``"write"`` (``data`` at ``addr``) or ``"sync"``."""

    @property
    def kind(self) -> str: ...
    @property
    def addr(self) -> Optional[int]: ...
    @property
    def data(self) -> Optional[bytes]: ...
    def __eq__(self, value: builtins.object, /) -> bool: ...

@final
class WritePlan:
    """The ordered steps that rewrite ``expected`` into ``result`` at ``addr``."""

    @property
    def steps(self) -> List[Step]: ...
    @property
    def addr(self) -> int: ...
    @property
    def expected(self) -> bytes: ...
    @property
    def result(self) -> bytes: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Step]: ...

def validate_site(code: bytes, address: int, jump_len: int = 5) -> Site: ...
def plan_apply(site: Site, current: bytes, target: int) -> WritePlan: ...
def plan_write(addr: int, current: bytes, new: bytes) -> WritePlan: ...
def plan_revert(applied: WritePlan) -> WritePlan: ...
def clobbered_registers(code: bytes, address: int) -> List[str]: ...
def written_registers(code: bytes, address: int) -> List[str]: ...
def registers_to_preserve(old_code: bytes, old_address: int, new_code: bytes,
                          new_address: int) -> List[str]: ...
def sysv_caller_saved() -> List[str]: ...
def pack_patch(target: _Path, object: _Path, out: Optional[_Path],
               replace: List[str] = ...) -> Patch: ...
def apply_patch(pid: int, patch: Patch, mode: str = "stop",
                timeout: float = 5.0) -> Dict[str, Any]: ...
def revert_patch(pid: int, patch_id: Optional[str] = None, mode: str = "stop",
                 timeout: float = 5.0) -> Dict[str, Any]: ...
def status_of(pid: Optional[int] = None) -> List[Dict[str, Any]]: ...
def processes_mapping(path: _Path) -> List[int]: ...
def _panic_for_test() -> None: ...
