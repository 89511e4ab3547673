"""livepatch.pack and livepatch.Patch on real gcc output; corrupt files are refused clearly."""

import livepatch
import pytest


def test_pack_writes_a_patch_that_loads_back_equal(built, tmp_path):
    out = tmp_path / "v2.lpp"
    patch = livepatch.pack(built["counter"], built["value2"], out)
    assert out.exists()
    loaded = livepatch.Patch.load(out)
    assert loaded == patch
    assert loaded.id == patch.id and len(patch.id) == 16
    assert patch.target_name == "counter"
    assert len(bytes.fromhex(patch.target_build_id)) >= 8
    [function] = patch.functions
    assert function.old_name == "value" and function.new_name == "value"
    assert len(function.old_bytes) == function.old_size > 0
    assert livepatch.Patch.from_bytes(out.read_bytes()) == patch


def test_the_build_id_is_the_targets(built):
    note = subprocess_output(["readelf", "-n", str(built["counter"])])
    patch = livepatch.pack(built["counter"], built["value2"], None)
    assert f"Build ID: {patch.target_build_id}" in note


def test_different_code_different_id_same_code_same_id(built):
    a = livepatch.pack(built["counter"], built["value2"], None)
    b = livepatch.pack(built["counter"], built["value3"], None)
    again = livepatch.pack(built["counter"], built["value2"], None)
    assert a.id != b.id
    assert a.id == again.id
    assert len({a, b, again}) == 2 and hash(a) == hash(again)


def test_explicit_replacement_forms_agree(built):
    by_default = livepatch.pack(built["counter"], built["value2"], None)
    for replace in ("value", ["value=value"], [("value", "value")], {"value": "value"}):
        assert livepatch.pack(built["counter"], built["value2"], None, replace=replace) == by_default


def test_replacing_a_missing_function_cannot_make_a_patch(built):
    with pytest.raises(livepatch.PatchFormatError, match="nosuch"):
        livepatch.pack(built["counter"], built["value2"], None, replace="nosuch=value")


def test_target_that_is_not_elf_is_an_input_error(built, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(livepatch.InputError, match="not an ELF"):
        livepatch.pack(text, built["value2"], None)


def test_missing_object_is_an_io_error(built, tmp_path):
    with pytest.raises(livepatch.IoError) as err:
        livepatch.pack(built["counter"], tmp_path / "missing.o", None)
    assert isinstance(err.value, OSError) and "missing.o" in str(err.value)


@pytest.mark.parametrize("damage", ["truncate", "flip", "magic", "empty"])
def test_corrupt_patch_file_is_a_patch_format_error(built, tmp_path, damage):
    good = tmp_path / "good.lpp"
    livepatch.pack(built["counter"], built["value2"], good)
    data = bytearray(good.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "magic":
        data[0:4] = b"ELF?"
    else:
        data = bytearray()
    bad = tmp_path / "bad.lpp"
    bad.write_bytes(bytes(data))
    with pytest.raises(livepatch.PatchFormatError) as err:
        livepatch.Patch.load(bad)
    message = str(err.value)
    assert message and "\n" not in message
    assert isinstance(err.value, ValueError)


def test_missing_patch_file(tmp_path):
    with pytest.raises(livepatch.IoError, match="nothere.lpp"):
        livepatch.Patch.load(tmp_path / "nothere.lpp")


def subprocess_output(argv):
    import subprocess

    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout
