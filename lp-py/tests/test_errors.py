"""The exception hierarchy and the panic guard (no process needed)."""

import livepatch
import livepatch._livepatch as native
import pytest


def test_every_error_is_a_livepatch_error():
    for name in livepatch._errors.__all__:
        assert issubclass(getattr(livepatch, name), livepatch.Error)


def test_builtin_bases_let_scripts_catch_generic_errors():
    assert issubclass(livepatch.AccessError, PermissionError)
    assert issubclass(livepatch.ProcessGoneError, ProcessLookupError)
    assert issubclass(livepatch.PatchFormatError, ValueError)


def test_rust_panic_becomes_internal_error_and_interpreter_survives():
    with pytest.raises(livepatch.InternalError, match="deliberate panic"):
        native._panic_for_test()
    # The interpreter is still fine, and so is the module: a second call behaves the same.
    with pytest.raises(livepatch.InternalError):
        native._panic_for_test()
