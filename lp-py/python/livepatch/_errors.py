"""The exceptions livepatch raises.

Every error is a :class:`livepatch.Error`; ``str(err)`` is the same one-line message the
``livepatch`` CLI prints. Where a builtin exception fits, the class subclasses it as well, so
``except PermissionError`` or ``except ProcessLookupError`` keeps working in scripts.
"""


class Error(Exception):
    """Base class of every livepatch error. ``str(err)`` is the CLI's one-line message."""


class BusyError(Error):
    """A thread stayed inside a function being switched until the timeout, or another tracer
    (a debugger) holds the process; nothing was changed."""


class MismatchError(Error):
    """The process does not run what the patch was built for (build-id or function bytes differ)."""


class AccessError(Error, PermissionError):
    """No permission to trace the process or to read a file."""


class ProcessGoneError(Error, ProcessLookupError):
    """The process does not exist, or exited while livepatch worked on it."""


class PatchFormatError(Error, ValueError):
    """A patch file is truncated, corrupted, or of an unknown format version; or ``pack`` cannot
    make a patch from its inputs (no such function, nothing replaced, not a relocatable object)."""


class InputError(Error, ValueError):
    """Bad input other than a patch file: not an ELF file, an unknown mode, a negative timeout."""


class IoError(Error, OSError):
    """Reading or writing a file failed (other than for lack of permission)."""


class NotFoundError(Error, LookupError):
    """No such patch is applied to the process (or nothing is applied at all)."""


class AlreadyAppliedError(Error):
    """The same patch is already applied to the process."""


class NotTopError(Error):
    """The patch cannot be reverted yet: another patch is stacked on one of its functions."""


class RefusedError(Error):
    """The patch cannot be applied safely (a site that cannot take a redirect, an object that
    cannot be linked, writable data that would shadow the target's)."""


class SiteError(RefusedError, ValueError):
    """lp-core refuses a function entry as a patch site (``livepatch.core.validate_site``)."""


class PlanError(Error, ValueError):
    """lp-core cannot plan the write (``livepatch.core.plan_*``): wrong lengths, bytes not as expected."""


class InternalError(Error):
    """A bug in livepatch itself (a Rust panic caught at the boundary). Please report it."""


__all__ = [
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
