"""lora_ops.io: every bad file gives a typed one-line error; saves are atomic and stay inside their root."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from lora_ops import io
from lora_ops.errors import LoraFileError, UnsafeFileError


def write_raw(path: Path, header: object, data: bytes = b"", *, raw_header: bytes | None = None) -> Path:
    """A safetensors file written by hand: u64 little-endian header length, JSON header, data buffer."""
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def f32(shape: list[int], begin: int) -> dict:
    n = 1
    for d in shape:
        n *= d
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + 4 * n]}


def expect(exc: type[Exception], *words: str, fn=io.load_state_dict, args=(), **kwargs) -> LoraFileError:
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for word in words:
        assert word in msg, f"{word!r} not in {msg!r}"
    return info.value


# ------------------------------------------------------------------------------------------------ bad files


def test_missing_file(tmp_path):
    p = tmp_path / "nope.safetensors"
    err = expect(LoraFileError, "nope.safetensors", "not found", args=(p,))
    assert err.file == str(p)
    expect(LoraFileError, "not found", fn=io.detect_file_kind, args=(p,))


def test_folder_is_not_a_file(tmp_path):
    expect(LoraFileError, "folder", args=(tmp_path,))


def test_empty_file(tmp_path):
    p = tmp_path / "empty.safetensors"
    p.write_bytes(b"")
    expect(LoraFileError, "empty.safetensors", "empty", args=(p,))


def test_truncated_5_bytes(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x10\x00\x00\x00\x00")
    expect(LoraFileError, "short.safetensors", "truncated", "5 bytes", args=(p,))


def test_header_length_larger_than_file(tmp_path):
    p = tmp_path / "cut.safetensors"
    good = safetensors.torch.save({"w": torch.zeros(4)})
    p.write_bytes(good[:20])
    expect(LoraFileError, "cut.safetensors", "truncated", "header length", args=(p,))


def test_absurd_header_length(tmp_path):
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", 2**40) + b"{}" + bytes(64))
    expect(LoraFileError, "huge.safetensors", "absurd", str(2**40), args=(p,))


def test_text_file_gets_a_text_hint(tmp_path):
    p = tmp_path / "error.safetensors"
    p.write_text('{"error": "Repository not found"}')
    expect(LoraFileError, "error.safetensors", "starts with text", "re-download", args=(p,))


def test_non_json_header(tmp_path):
    p = write_raw(tmp_path / "bad.safetensors", None, raw_header=b"{not json at all")
    expect(LoraFileError, "bad.safetensors", "not valid JSON", args=(p,))


def test_non_utf8_header(tmp_path):
    p = write_raw(tmp_path / "bin.safetensors", None, raw_header=b'{"\xff\xfe": 1}')
    expect(LoraFileError, "bin.safetensors", "UTF-8", args=(p,))


def test_header_json_list(tmp_path):
    p = write_raw(tmp_path / "list.safetensors", None, raw_header=b'  [{"a": 1}]')
    expect(LoraFileError, "list.safetensors", "list instead of an object", args=(p,))


def test_non_string_metadata(tmp_path):
    p = write_raw(tmp_path / "meta.safetensors", {"__metadata__": {"ss_epoch": 3}, "w": f32([1], 0)}, bytes(4))
    err = expect(LoraFileError, "meta.safetensors", "non-string metadata", "ss_epoch", args=(p,))
    assert err.key == "__metadata__"


def test_null_metadata_is_accepted(tmp_path):
    p = write_raw(tmp_path / "m.safetensors", {"__metadata__": None, "w": f32([1], 0)}, bytes(4))
    tensors, meta = io.load_state_dict(p)
    assert meta == {} and tensors["w"].shape == (1,)


def test_unknown_dtype(tmp_path):
    p = write_raw(tmp_path / "dt.safetensors", {"w": {"dtype": "F12", "shape": [1], "data_offsets": [0, 2]}}, bytes(2))
    err = expect(LoraFileError, "dt.safetensors", "key 'w'", "unknown dtype 'F12'", args=(p,))
    assert err.key == "w"


def test_bad_shape(tmp_path):
    p = write_raw(tmp_path / "s.safetensors", {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4))
    expect(LoraFileError, "key 'w'", "shape", "non-negative", args=(p,))


def test_offsets_out_of_range(tmp_path):
    p = write_raw(tmp_path / "oor.safetensors", {"w": f32([4], 0)}, bytes(8))
    expect(LoraFileError, "oor.safetensors", "key 'w'", "out of range", "8 bytes", args=(p,))


def test_overlapping_offsets(tmp_path):
    header = {"a": f32([2], 0), "b": f32([2], 4)}
    p = write_raw(tmp_path / "ovl.safetensors", header, bytes(12))
    expect(LoraFileError, "ovl.safetensors", "key 'b'", "overlap", "'a'", args=(p,))


def test_gap_and_trailing_bytes(tmp_path):
    p = write_raw(tmp_path / "gap.safetensors", {"a": f32([1], 0), "b": f32([1], 8)}, bytes(12))
    expect(LoraFileError, "key 'b'", "unaccounted", args=(p,))
    p = write_raw(tmp_path / "tail.safetensors", {"a": f32([1], 0)}, bytes(8))
    expect(LoraFileError, "tail.safetensors", "4 bytes after the last tensor", args=(p,))


def test_size_shape_mismatch(tmp_path):
    p = write_raw(
        tmp_path / "mm.safetensors", {"w": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 8]}}, bytes(8)
    )
    expect(LoraFileError, "mm.safetensors", "key 'w'", "size/shape mismatch", "12 bytes", args=(p,))


def test_duplicate_key(tmp_path):
    entry = json.dumps(f32([1], 0))
    p = write_raw(tmp_path / "dup.safetensors", None, bytes(4), raw_header=f'{{"w": {entry}, "w": {entry}}}'.encode())
    expect(LoraFileError, "key 'w'", "twice", args=(p,))


def test_lfs_pointer(tmp_path):
    p = tmp_path / "lora.safetensors"
    p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 1234\n")
    assert io.detect_file_kind(p) == "lfs-pointer"
    expect(LoraFileError, "lora.safetensors", "git-LFS pointer", "re-download", args=(p,))
    expect(LoraFileError, "git-LFS pointer", fn=io.read_safetensors_header, args=(p,))


def test_html_page(tmp_path):
    p = tmp_path / "page.safetensors"
    p.write_text("<!DOCTYPE html>\n<html><body>Sign in to download</body></html>")
    assert io.detect_file_kind(p) == "html"
    expect(LoraFileError, "page.safetensors", "HTML page", "re-download", args=(p,))
    q = tmp_path / "page2.safetensors"
    q.write_text("\n  <html lang=en>")
    assert io.detect_file_kind(q) == "html"


def test_valid_header_is_parsed(tmp_path):
    p = tmp_path / "ok.safetensors"
    safetensors.torch.save_file({"a": torch.ones(2, 3)}, str(p), metadata={"k": "v"})
    header, start = io.read_safetensors_header(p)
    assert header["a"]["shape"] == [2, 3] and header["__metadata__"] == {"k": "v"}
    assert start == 8 + struct.unpack("<Q", p.read_bytes()[:8])[0]
    assert io.detect_file_kind(p) == "safetensors"


def test_header_length_starting_with_pickle_byte_is_still_safetensors(tmp_path):
    # 0x0380 = 896: the first two bytes read b"\x80\x03", like a pickle protocol-3 opener.
    body = json.dumps({"w": f32([1], 0)}).encode()
    h = body + b" " * (0x0380 - len(body))
    p = write_raw(tmp_path / "x.safetensors", None, struct.pack("<f", 2.5), raw_header=h)
    assert p.read_bytes()[:2] == b"\x80\x03"
    assert io.detect_file_kind(p) == "safetensors"
    assert io.load_state_dict(p)[0]["w"].item() == 2.5


def test_unknown_kind(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"\x00\x01\x02")
    assert io.detect_file_kind(p) == "unknown"


# ----------------------------------------------------------------------------------------------- pickles


class NotATensor:
    """A custom class: weights_only loading must refuse it (it could be anything, including code)."""


def test_pickle_refused_without_permission(tmp_path):
    p = tmp_path / "lora.pt"
    torch.save({"w": torch.ones(2)}, p)
    assert io.detect_file_kind(p) == "torch-zip"
    err = expect(UnsafeFileError, "lora.pt", "allow_pickle=True", "convert", args=(p,))
    assert "--allow-pickle" not in str(err)  # the library speaks API; the CLI and nodes translate
    assert err.hint and "run code" in err.hint


def test_pickle_named_safetensors_is_still_a_pickle(tmp_path):
    p = tmp_path / "fake.safetensors"
    p.write_bytes(pickle.dumps({"w": 1}, protocol=4))
    assert io.detect_file_kind(p) == "pickle"
    expect(UnsafeFileError, "fake.safetensors", "pickle", args=(p,))
    expect(UnsafeFileError, "not safetensors", fn=io.read_safetensors_header, args=(p,))


def test_torch_zip_with_permission(tmp_path):
    p = tmp_path / "lora.ckpt"
    want = {"a": torch.randn(3, 2), "b": torch.randn(4).to(torch.bfloat16)}
    torch.save(want, p)
    tensors, meta = io.load_state_dict(p, allow_pickle=True)
    assert meta == {} and set(tensors) == {"a", "b"}
    assert torch.equal(tensors["a"], want["a"]) and tensors["b"].dtype == torch.bfloat16


def test_legacy_raw_pickle_with_permission(tmp_path):
    p = tmp_path / "old.bin"
    torch.save({"w": torch.arange(5.0)}, p, _use_new_zipfile_serialization=False)
    assert io.detect_file_kind(p) == "pickle"
    tensors, _ = io.load_state_dict(p, allow_pickle=True)
    assert torch.equal(tensors["w"], torch.arange(5.0))


def test_nested_state_dict_is_unwrapped(tmp_path):
    p = tmp_path / "trainer.ckpt"
    torch.save({"epoch": 7, "global_step": 100, "state_dict": {"w": torch.ones(2, 2)}}, p)
    tensors, _ = io.load_state_dict(p, allow_pickle=True)
    assert list(tensors) == ["w"]


def test_pickle_custom_class_refused_even_with_permission(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "obj": NotATensor()}, p)
    expect(UnsafeFileError, "evil.pt", "NotATensor", "weights_only", args=(p,), allow_pickle=True)


def test_pickle_non_tensor_value_names_the_key(tmp_path):
    p = tmp_path / "mixed.pt"
    torch.save({"w": torch.ones(1), "note": "hello"}, p)
    err = expect(LoraFileError, "mixed.pt", "key 'note'", "str, not a tensor", args=(p,), allow_pickle=True)
    assert err.key == "note"


def test_pickle_that_is_not_a_dict(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.ones(1)], p)
    expect(LoraFileError, "list.pt", "list, not a dict", args=(p,), allow_pickle=True)


def test_corrupt_torch_zip(tmp_path):
    p = tmp_path / "broken.pt"
    torch.save({"w": torch.ones(100)}, p)
    p.write_bytes(p.read_bytes()[:200])
    expect(LoraFileError, "broken.pt", "cannot read the torch file", args=(p,), allow_pickle=True)


def test_code_never_unpickles_fully():
    forbidden = "weights_only" + "=False"
    for path in (Path(io.__file__), Path(__file__)):
        assert forbidden not in path.read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_round_trip_exact(tmp_path, dtype):
    g = torch.Generator().manual_seed(1)
    want = {
        "lora_unet_x.lora_down.weight": torch.randn(4, 16, generator=g).to(dtype),
        "lora_unet_x.lora_up.weight": torch.randn(8, 4, 1, 1, generator=g).to(dtype),
        "lora_unet_x.alpha": torch.tensor(4.0).to(dtype),
    }
    meta = {"ss_network_dim": "4", "ss_tag_frequency": json.dumps({"a": {"b": 1}}), "ünïcode": "✓"}
    out = io.save_state_dict(tmp_path / "sub" / "rt.safetensors", want, meta)
    assert out == (tmp_path / "sub" / "rt.safetensors").resolve()
    assert [x.name for x in out.parent.iterdir()] == ["rt.safetensors"]  # no temp file left behind
    got, got_meta = io.load_state_dict(out)
    assert got_meta == meta and set(got) == set(want)
    for k, t in want.items():
        assert got[k].dtype == dtype and got[k].shape == t.shape
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_save_handles_views_shared_storage_and_grad(tmp_path):
    base = torch.randn(4, 6, requires_grad=True)
    want = {"t": base.detach().t(), "a": base.detach()[:2], "b": base.detach()[2:], "g": base * 2}
    p = io.save_state_dict(tmp_path / "v.safetensors", want)
    got, meta = io.load_state_dict(p)
    assert meta == {}
    for k, t in want.items():
        assert torch.equal(got[k], t.detach())


def test_loaded_tensors_do_not_map_the_file(tmp_path):
    p = io.save_state_dict(tmp_path / "a.safetensors", {"w": torch.zeros(8)})
    tensors, _ = io.load_state_dict(p)
    with open(p, "r+b") as f:  # rewrite the data in place: a mapped tensor would change with it
        f.seek(-4, os.SEEK_END)
        f.write(struct.pack("<f", 1.0))
    assert torch.equal(tensors["w"], torch.zeros(8))


def test_save_validates_before_writing(tmp_path):
    p = tmp_path / "x.safetensors"
    expect(LoraFileError, "key 'b'", "int, not a tensor", fn=io.save_state_dict, args=(p, {"a": torch.ones(1), "b": 3}))
    expect(LoraFileError, "non-string metadata", "'n'", fn=io.save_state_dict, args=(p, {"a": torch.ones(1)}, {"n": 1}))
    expect(LoraFileError, "not a string", fn=io.save_state_dict, args=(p, {1: torch.ones(1)}))
    expect(LoraFileError, "reserved", fn=io.save_state_dict, args=(p, {"__metadata__": torch.ones(1)}))
    expect(LoraFileError, "complex128", fn=io.save_state_dict, args=(p, {"c": torch.ones(1, dtype=torch.complex128)}))
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- atomicity


def _old_file(tmp_path: Path) -> tuple[Path, bytes]:
    p = io.save_state_dict(tmp_path / "keep.safetensors", {"w": torch.arange(6.0)}, {"v": "1"})
    return p, p.read_bytes()


def test_failing_serializer_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    p, before = _old_file(tmp_path)

    def half_write(tensors, metadata, tmp):
        Path(tmp).write_bytes(b"partial garbage")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(io, "_write_safetensors", half_write)
    expect(
        LoraFileError,
        "keep.safetensors",
        "disk on fire",
        "nothing was changed",
        fn=io.save_state_dict,
        args=(p, {"w": torch.zeros(6)}),
        overwrite=True,
    )
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["keep.safetensors"]


def test_failing_replace_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    p, before = _old_file(tmp_path)

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(io.os, "replace", boom)
        expect(
            LoraFileError,
            "No space left",
            "cannot write",
            fn=io.save_state_dict,
            args=(p, {"w": torch.zeros(6)}),
            overwrite=True,
        )
    assert p.read_bytes() == before
    assert not [x for x in tmp_path.iterdir() if x.name.endswith(".tmp")]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["keep.safetensors"]


def test_overwrite_refused_without_flag(tmp_path):
    p, before = _old_file(tmp_path)
    expect(
        LoraFileError,
        "keep.safetensors",
        "already exists",
        "overwrite=True",
        fn=io.save_state_dict,
        args=(p, {"w": torch.zeros(1)}),
    )
    assert p.read_bytes() == before
    io.save_state_dict(p, {"w": torch.zeros(1)}, overwrite=True)
    assert torch.equal(io.load_state_dict(p)[0]["w"], torch.zeros(1))


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_overwrite_keeps_file_mode(tmp_path):
    p, _ = _old_file(tmp_path)
    os.chmod(p, 0o640)
    io.save_state_dict(p, {"w": torch.zeros(1)}, overwrite=True)
    assert p.stat().st_mode & 0o777 == 0o640


def test_root_escape_refused(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    t = {"w": torch.ones(1)}
    shown_root = str(root.resolve())
    expect(LoraFileError, "outside", shown_root, fn=io.save_state_dict, args=("../x.safetensors", t), root=root)
    abs_elsewhere = outside / "y.safetensors"
    expect(LoraFileError, "outside", str(abs_elsewhere), fn=io.save_state_dict, args=(abs_elsewhere, t), root=root)
    assert list(outside.iterdir()) == [] and not (tmp_path / "x.safetensors").exists()
    ok = io.save_state_dict("sub/dir/ok.safetensors", t, root=root)
    assert ok == (root / "sub" / "dir" / "ok.safetensors").resolve() and ok.is_file()
    assert io.save_state_dict(root / "abs.safetensors", t, root=root).is_file()


def test_root_escape_by_symlink_refused(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    try:
        (root / "link").symlink_to(outside, target_is_directory=True)
    except OSError:  # Windows without developer mode
        pytest.skip("cannot create symlinks here")
    t = {"w": torch.ones(1)}
    target = root / "link" / "z.safetensors"
    expect(LoraFileError, "outside", "link", str(root.resolve()), fn=io.save_state_dict, args=(target, t), root=root)
    expect(LoraFileError, "outside", fn=io.safe_join, args=(root, "link/z.safetensors"))
    assert list(outside.iterdir()) == []


def test_safe_join(tmp_path):
    assert io.safe_join(tmp_path, "a/b.safetensors") == (tmp_path / "a" / "b.safetensors").resolve()
    assert io.safe_join(tmp_path, "a/../b") == (tmp_path / "b").resolve()
    expect(LoraFileError, "../../x", "outside", fn=io.safe_join, args=(tmp_path, "../../x"))
    expect(LoraFileError, "outside", fn=io.safe_join, args=(tmp_path, "/etc/passwd"))


def test_target_is_a_folder(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    expect(LoraFileError, "folder", fn=io.save_state_dict, args=(tmp_path / "d.safetensors", {"w": torch.ones(1)}))


# ------------------------------------------------------------------------------------------ values and hashes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float8_e5m2])
def test_find_non_finite(dtype):
    t = {
        "ok": torch.ones(10).to(dtype),
        "nan": torch.tensor([1.0, float("nan")]).to(dtype),
        "inf": torch.tensor([float("-inf"), 0.0]).to(dtype),
        "int": torch.arange(3),
    }
    assert io.find_non_finite(t) == ["nan", "inf"]


def test_find_non_finite_chunks_and_fp8_nan():
    big = torch.zeros(100)
    big[97] = float("inf")
    fp8 = torch.tensor([1.0, float("nan")]).to(torch.float8_e4m3fn)
    assert io.find_non_finite({"big": big, "fp8": fp8}, chunk=16) == ["big", "fp8"]


def test_hashes(tmp_path):
    p = io.save_state_dict(tmp_path / "h.safetensors", {"w": torch.arange(4.0)}, {"a": "1"})
    raw = p.read_bytes()
    assert io.file_sha256(p, chunk=7) == hashlib.sha256(raw).hexdigest()
    n = struct.unpack("<Q", raw[:8])[0]
    assert io.safetensors_model_hash(p) == hashlib.sha256(raw[8 + n :]).hexdigest()
    # metadata does not change the model hash, only the file hash
    q = io.save_state_dict(tmp_path / "h2.safetensors", {"w": torch.arange(4.0)}, {"a": "2", "b": "3"})
    assert io.safetensors_model_hash(q) == io.safetensors_model_hash(p)
    assert io.file_sha256(q) != io.file_sha256(p)
    expect(LoraFileError, "not found", fn=io.file_sha256, args=(tmp_path / "none",))


@pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")
def test_new_file_gets_normal_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    p = io.save_state_dict(tmp_path / "n.safetensors", {"w": torch.ones(1)})
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask
