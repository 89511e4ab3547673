"""Live-patch running Linux processes from Python.

``import livepatch`` gives scripts what the ``livepatch`` CLI does — pack a patch, apply it to a
running process, revert it, report status — plus the processes that map a given file, and
read-only access to lp-core's site validation and write planning (:mod:`livepatch.core`).

The work is done by the same Rust code the CLI runs (``lp-userspace`` and ``lp-core``); this
package only converts arguments and results. Errors are :class:`livepatch.Error` subclasses whose
``str()`` is the CLI's one-line message.

>>> import livepatch
>>> patch = livepatch.pack("./server", "fix.o", "fix.lpp")        # doctest: +SKIP
>>> livepatch.apply(pid, patch)                                    # doctest: +SKIP
>>> livepatch.status(pid)[0]["patches"][0]["id"] == patch.id       # doctest: +SKIP
True
>>> livepatch.revert(pid)                                          # doctest: +SKIP
"""

from . import _livepatch, core
from ._api import (
    Applied,
    AppliedFunction,
    FunctionStatus,
    PatchStatus,
    ProcessStatus,
    Reverted,
    SwitchStats,
    apply,
    pack,
    processes_mapping,
    revert,
    status,
)
from ._errors import (
    AccessError,
    AlreadyAppliedError,
    BusyError,
    Error,
    InputError,
    InternalError,
    IoError,
    MismatchError,
    NotFoundError,
    NotTopError,
    PatchFormatError,
    PlanError,
    ProcessGoneError,
    RefusedError,
    SiteError,
)
from ._livepatch import Function, Patch

__version__: str = _livepatch.__version__

__all__ = [
    "Patch",
    "Function",
    "pack",
    "apply",
    "revert",
    "status",
    "processes_mapping",
    "core",
    "Applied",
    "AppliedFunction",
    "Reverted",
    "SwitchStats",
    "ProcessStatus",
    "PatchStatus",
    "FunctionStatus",
    "Error",
    "BusyError",
    "MismatchError",
    "AccessError",
    "ProcessGoneError",
    "PatchFormatError",
    "InputError",
    "IoError",
    "NotFoundError",
    "AlreadyAppliedError",
    "NotTopError",
    "RefusedError",
    "SiteError",
    "PlanError",
    "InternalError",
]
