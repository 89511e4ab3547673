"""The process operations: thin wrappers that normalise arguments for the native module."""

import os
from typing import Iterable, List, Mapping, Optional, Tuple, TypedDict, Union, cast

from . import _livepatch
from ._livepatch import Patch

PathLike = Union[str, "os.PathLike[str]"]
Replace = Union[None, str, Mapping[str, str], Iterable[Union[str, Tuple[str, str]]]]


class SwitchStats(TypedDict):
    """Figures of one switch."""

    stall_us: int  #: longest time all threads were stopped (stop) / one thread paused (nonstop)
    attempts: int  #: attempts until no thread was busy (stop mode)
    traps: int  #: threads redirected at the temporary int3 (nonstop mode)


class AppliedFunction(TypedDict):
    """A function as redirected by :func:`apply`."""

    name: str
    old: int  #: the old function's entry in the process
    new: int  #: the new function's entry
    thunk: bool  #: reached through a register-preserving thunk
    call_sites: int  #: direct callers in the module retargeted at the new code


class Applied(TypedDict):
    """What :func:`apply` returns (``livepatch apply --json``)."""

    pid: int
    id: str
    module: str
    mode: str
    functions: List[AppliedFunction]
    stats: SwitchStats
    total_us: int


class Reverted(TypedDict):
    """What :func:`revert` returns (``livepatch revert --json``)."""

    pid: int
    id: str
    functions: List[str]
    code_freed: bool  #: patch memory unmapped (False: a thread was still inside it, left mapped)
    stats: SwitchStats
    total_us: int


class _FunctionStatusOptional(TypedDict, total=False):
    #: the register-preserving thunk in front of the new code, when it needs one
    thunk: str
    #: the dispatch every call goes through (a patch applied in nonstop mode)
    dispatch: str


class FunctionStatus(_FunctionStatusOptional):
    """One redirected function in :func:`status` (addresses as hex strings, like the CLI)."""

    name: str
    old: str
    new: str
    call_sites: int  #: direct callers in the module retargeted at the new code
    #: the original's displaced first instructions, then a jump back (runs the old code)
    trampoline: str


class _PatchStatusOptional(TypedDict, total=False):
    #: gdb command naming the generated code (trampolines, thunks, dispatches): absent when
    #: its symbol file could not be written
    gdb_stubs_command: str


class PatchStatus(_PatchStatusOptional):
    """One applied patch in :func:`status`."""

    id: str
    applied_at: int  #: seconds since the epoch
    module: str  #: path of the patched module
    build_id: str
    mode: str
    functions: List[FunctionStatus]
    #: gdb command naming the new functions (``add-symbol-file`` of the saved patch object with
    #: each section at its runtime address); "" when none was saved
    gdb_command: str


class ProcessStatus(TypedDict):
    """One process in :func:`status` (``livepatch status --json``)."""

    pid: int
    comm: str
    patches: List[PatchStatus]  #: oldest first


def _replace_specs(replace: Replace) -> List[str]:
    """``OLD[=NEW]`` strings, as the CLI's ``--replace``, from the forms scripts find natural."""
    if replace is None:
        return []
    if isinstance(replace, str):
        return [replace]
    if isinstance(replace, Mapping):
        return [f"{old}={new}" for old, new in replace.items()]
    specs = []
    for item in replace:
        if isinstance(item, str):
            specs.append(item)
        else:
            old, new = item
            specs.append(f"{old}={new}")
    return specs


def pack(target: PathLike, object: PathLike, out: Optional[PathLike],
         replace: Replace = None) -> Patch:
    """Packs a patch, like ``livepatch pack --target TARGET --object OBJECT -o OUT``.

    ``target`` is the executable or shared library to patch, ``object`` a relocatable object
    (``gcc -c -fPIC``) with the new functions. A function of the object with the name of a
    function of the target replaces it, unless ``replace`` maps names explicitly: an ``"OLD=NEW"``
    string, a list of them or of ``(old, new)`` pairs, or a ``{old: new}`` dict (``OLD`` may be
    ``name``, ``name@file.c`` or ``name,N``). The patch is written to ``out`` unless it is None.

    Raises :class:`PatchFormatError` (no such function, ambiguous name, nothing replaced, not a
    relocatable object...), :class:`InputError` (not an ELF file), :class:`IoError` or
    :class:`RefusedError` (the object cannot be linked, or shadows the target's data).
    """
    out_path = None if out is None else os.fspath(out)
    return _livepatch.pack_patch(os.fspath(target), os.fspath(object), out_path,
                                 _replace_specs(replace))


def _as_patch(patch: Union[Patch, PathLike]) -> Patch:
    return patch if isinstance(patch, Patch) else Patch.load(os.fspath(patch))


def apply(pid: int, patch: Union[Patch, PathLike], mode: str = "stop",
          timeout: float = 5.0) -> Applied:
    """Applies ``patch`` (a :class:`Patch` or a patch file's path) to process ``pid``.

    Returns only once the patch is fully in place, with what ``livepatch apply`` reports (pid,
    id, module, mode, functions with their old and new addresses, switch figures). ``mode`` is
    ``"stop"`` (every thread stopped and its stack checked; retried with backoff until
    ``timeout`` seconds) or ``"nonstop"``. The GIL is released meanwhile.

    On any error the process is left exactly as it was: :class:`BusyError`,
    :class:`MismatchError`, :class:`AlreadyAppliedError`, :class:`ProcessGoneError`,
    :class:`AccessError`, :class:`RefusedError`, :class:`PatchFormatError`...
    """
    return cast(Applied, _livepatch.apply_patch(int(pid), _as_patch(patch), mode, float(timeout)))


def revert(pid: int, patch_id: Union[None, str, Patch] = None, mode: str = "stop",
           timeout: float = 5.0) -> Reverted:
    """Takes a patch back out of process ``pid``: the newest by default, else ``patch_id`` (an id,
    a unique prefix of one, or a :class:`Patch`). Only the top of a stack may be reverted
    (:class:`NotTopError` otherwise). Returns what ``livepatch revert`` reports.
    """
    if isinstance(patch_id, Patch):
        patch_id = patch_id.id
    return cast(Reverted, _livepatch.revert_patch(int(pid), patch_id, mode, float(timeout)))


def status(pid: Optional[int] = None) -> List[ProcessStatus]:
    """What is applied: for ``pid``, or for every process with livepatch state when None.

    The same records as ``livepatch status --json``: ``{"pid", "comm", "patches": [{"id",
    "applied_at", "module", "build_id", "mode", "functions": [{"name", "old", "new"}],
    "gdb_command"}]}``. ``gdb_command`` is what to type in ``gdb -p PID`` so that it names the
    patch's new functions.
    """
    return cast(List[ProcessStatus], _livepatch.status_of(None if pid is None else int(pid)))


def processes_mapping(path: PathLike) -> List[int]:
    """The pids of the processes that map the file ``path`` (an executable or a shared library),
    compared by device and inode so another name of the same file counts. For scripts that patch
    every process using a library. Processes that exit or deny access meanwhile are skipped.
    """
    return _livepatch.processes_mapping(os.fspath(path))
