"""Live-patch running Linux processes from Python.

``import livepatch`` gives scripts what the ``livepatch`` CLI does — pack a patch, apply it to a
running process, revert it, report status — plus the processes that map a given file, and
read-only access to lp-core's site validation and write planning (:mod:`livepatch.core`).

The work is done by the same Rust code the CLI runs (``lp-userspace`` and ``lp-core``); this
package only converts arguments and results.
"""

from . import _livepatch
from ._errors import *  # noqa: F401,F403  (the exception hierarchy is part of the API)
from ._errors import __all__ as _error_names

__version__: str = _livepatch.__version__

__all__ = list(_error_names)
