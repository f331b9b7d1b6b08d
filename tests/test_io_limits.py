"""lora_ops.io, load side (issue 12): only regular files, and never a blocked read; limits and the format decision
come from the header before any tensor is read; the one-read CPU path is bit-identical to the safetensors
library and leaves tensors that are writable and independent of the file."""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import warnings
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from lora_ops import files, io
from lora_ops import lora as L
from lora_ops.errors import LoraFileError, LoraFormatError
from lora_ops.lora import LoRA, LoRALayer

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")


def write_raw(path: Path, header: object, data: bytes = b"", *, raw_header: bytes | None = None) -> Path:
    """A safetensors file written by hand: u64 little-endian header length, JSON header, data buffer."""
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def u8_file(path: Path, names: list[str], *, offsets_key: str = "data_offsets") -> Path:
    """One U8 [1] tensor per name; ``offsets_key`` is the key's JSON spelling (escapes allowed)."""
    body = ",".join(f'"{n}":{{"dtype":"U8","shape":[1],"{offsets_key}":[{i},{i + 1}]}}' for i, n in enumerate(names))
    return write_raw(path, None, bytes(range(len(names))) if len(names) < 256 else bytes(len(names)),
                     raw_header=("{" + body + "}").encode())


def bounded(fn, *args, fifo: Path | None = None, timeout: float = 10.0, **kwargs) -> BaseException | None:
    """Run ``fn`` in a thread; fail the test if it is still running after ``timeout`` (a blocked open/read).

    A reader blocked on ``fifo`` is then released (a writer opening and closing it gives it end-of-file), so a
    regression fails this test instead of hanging the whole run. Returns the exception ``fn`` raised, if any.
    """
    box: dict[str, BaseException] = {}

    def target() -> None:
        try:
            fn(*args, **kwargs)
        except BaseException as err:  # handed to the test
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        if fifo is not None:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"{getattr(fn, '__name__', fn)} was still blocked after {timeout}s")
    return box.get("error")


def assert_refused(err: BaseException | None, path: Path, what: str) -> None:
    assert isinstance(err, LoraFileError), repr(err)
    msg = str(err)
    assert "\n" not in msg and str(path) in msg and err.file == str(path), msg
    assert f"not a regular file ({what})" in msg, msg


# ------------------------------------------------------------------------------------------- regular files only

READERS = [
    io.load_state_dict,
    io.read_safetensors_header,
    io.detect_file_kind,
    io.file_sha256,
    io.safetensors_model_hash,
    files.load_lora,
]


@needs_fifo
@pytest.mark.parametrize("fn", READERS, ids=lambda fn: fn.__name__)
def test_fifo_is_refused_at_once(tmp_path, fn):
    """A FIFO would block the open until some writer appears: every reader refuses it instead, naming it."""
    fifo = tmp_path / "lora.safetensors"
    os.mkfifo(fifo)
    assert_refused(bounded(fn, fifo, fifo=fifo), fifo, "a FIFO")


@needs_fifo
def test_fifo_swapped_in_after_the_stat_is_refused(tmp_path, monkeypatch):
    """The race: the stat saw a regular file, then the path became a FIFO. The non-blocking open and the fstat
    of the opened descriptor still refuse it without waiting for a writer."""
    fifo = tmp_path / "swapped.safetensors"
    os.mkfifo(fifo)
    monkeypatch.setattr(io, "_stat_file", lambda path: None)  # as if stat() had seen a regular file
    for fn in (io.load_state_dict, io.read_safetensors_header, io.file_sha256):
        assert_refused(bounded(fn, fifo, fifo=fifo), fifo, "a FIFO")


@needs_fifo
def test_symlinks_are_followed_to_what_they_name(tmp_path):
    """A symlink to a regular file loads; a symlink to a FIFO is refused like the FIFO."""
    real = tmp_path / "real.safetensors"
    safetensors.torch.save_file({"w": torch.arange(3.0)}, str(real))
    link = tmp_path / "link.safetensors"
    link.symlink_to(real)
    assert torch.equal(io.load_state_dict(link)[0]["w"], torch.arange(3.0))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    bad = tmp_path / "bad.safetensors"
    bad.symlink_to(fifo)
    assert_refused(bounded(io.load_state_dict, bad, fifo=fifo), bad, "a FIFO")


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_character_devices_are_refused(device):
    """/dev/zero never ends and /dev/null reads as an "empty file": both are refused as devices, up front."""
    path = Path(device)
    if not path.exists():
        pytest.skip(f"no {device} here")
    for fn in (io.load_state_dict, io.read_safetensors_header, io.detect_file_kind, files.load_lora):
        assert_refused(bounded(fn, path), path, "a character device")
    if device == "/dev/null":  # hashing /dev/zero would never end before the fix: only the finite one here
        assert_refused(bounded(io.file_sha256, path), path, "a character device")


def test_a_socket_is_refused(tmp_path):
    socket = pytest.importorskip("socket")
    if not hasattr(socket, "AF_UNIX"):
        pytest.skip("no Unix sockets")
    path = tmp_path / "s.safetensors"
    with socket.socket(socket.AF_UNIX) as server:
        try:
            server.bind(str(path))
        except OSError as err:  # e.g. a tmp path longer than sun_path allows
            pytest.skip(f"cannot bind a Unix socket here ({err})")
        assert_refused(bounded(io.load_state_dict, path), path, "a socket")


# ------------------------------------------------------------------------------------------ limits from the header


def test_tensor_count_limit(tmp_path, monkeypatch):
    """More than MAX_TENSORS entries is refused from the header, naming the file, the count and the limit."""
    monkeypatch.setattr(io, "MAX_TENSORS", 10)
    ok = u8_file(tmp_path / "ten.safetensors", [f"t{i}" for i in range(10)])
    assert len(io.load_state_dict(ok)[0]) == 10
    many = u8_file(tmp_path / "eleven.safetensors", [f"t{i}" for i in range(11)])
    for fn in (io.load_state_dict, io.read_safetensors_header, files.load_lora):
        with pytest.raises(LoraFileError) as info:
            fn(many)
        msg = str(info.value)
        assert "eleven.safetensors" in msg and "too many tensors" in msg and "11" in msg and "limit 10" in msg, msg


def test_tensor_count_is_checked_before_the_json_is_parsed(tmp_path, monkeypatch):
    """An honest over-limit header is refused by a byte count, before parsing builds its objects."""
    monkeypatch.setattr(io, "MAX_TENSORS", 10)
    many = u8_file(tmp_path / "many.safetensors", [f"t{i}" for i in range(50)])

    def no_parse(*args, **kwargs):
        raise AssertionError("the header was parsed")

    monkeypatch.setattr(io.json, "loads", no_parse)
    with pytest.raises(LoraFileError, match="too many tensors: the header describes about 50"):
        io.read_safetensors_header(many)


def test_tensor_count_limit_holds_for_escaped_names(tmp_path, monkeypatch):
    """"data\\u005foffsets" is "data_offsets" to JSON but not to a byte count: the exact check after parsing
    refuses it anyway."""
    monkeypatch.setattr(io, "MAX_TENSORS", 10)
    p = u8_file(tmp_path / "sly.safetensors", [f"t{i}" for i in range(11)], offsets_key="data\\u005foffsets")
    with pytest.raises(LoraFileError, match="too many tensors: the header describes 11 "):
        io.read_safetensors_header(p)


def test_default_tensor_limit_admits_real_files():
    # the largest real files (full FLUX/SDXL checkpoints, LyCORIS full) have well under 20_000 tensors
    assert 20_000 * 5 <= io.MAX_TENSORS <= 1_000_000


def test_f4_with_an_odd_last_dimension_is_refused_from_the_header(tmp_path):
    """torch packs two F4 values per element along the last dimension: the library cannot load [2, 3]; the header
    check says so, instead of a library error after the header passed."""
    p = write_raw(tmp_path / "f4.safetensors", {"w": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]}},
                  bytes(3))
    for fn in (io.read_safetensors_header, io.load_state_dict):
        with pytest.raises(LoraFileError, match="last dimension, which must be even") as info:
            fn(p)
        assert info.value.key == "w"


# --------------------------------------------------------------------------------- format decided from the header


def test_many_tensor_non_lora_is_refused_before_any_tensor_is_read(tmp_path, monkeypatch):
    """load_lora decides the format from the names: a 20_000-tensor file of no known format never gets its tensors
    loaded (checked by making every tensor loader fail, not by timing)."""
    p = u8_file(tmp_path / "model.safetensors", [f"model.layers.{i}.weight" for i in range(20_000)])

    def no_load(*args, **kwargs):
        raise AssertionError("tensors were loaded")

    monkeypatch.setattr(io, "load_state_dict", no_load)
    monkeypatch.setattr(io, "_read_tensors", no_load)
    monkeypatch.setattr(io.safetensors, "safe_open", no_load)
    with pytest.raises(LoraFormatError, match="not a LoRA file in any known format") as info:
        files.load_lora(p)
    assert info.value.file == str(p)


def test_load_lora_parses_the_header_once(tmp_path, monkeypatch):
    """A real LoRA still loads through load_lora, the header read once and handed to load_state_dict."""
    g = torch.Generator().manual_seed(3)
    modules = ["unet.input_blocks.1.1.proj_in", "te1.text_model.encoder.layers.0.self_attn.q_proj"]
    lora = LoRA({m: LoRALayer(torch.randn(2, 8, generator=g), torch.randn(8, 2, generator=g), 2.0) for m in modules})
    p = files.save_lora(lora, tmp_path / "l.safetensors", "kohya")
    parses, passed = [], []
    real_loads, real_load = io.json.loads, io.load_state_dict

    def counting_loads(*args, **kwargs):
        parses.append(1)
        return real_loads(*args, **kwargs)

    def spy(path, **kwargs):
        passed.append(kwargs.get("header") is not None)
        return real_load(path, **kwargs)

    monkeypatch.setattr(io.json, "loads", counting_loads)
    monkeypatch.setattr(io, "load_state_dict", spy)
    got = files.load_lora(p)
    assert parses == [1] and passed == [True]
    assert got.source_format == "kohya" and L.equal(got, lora)


# ------------------------------------------------------------------------------------------ the one-read CPU path


def _every_dtype_file(path: Path, *, misalign: bool) -> Path:
    """Every dtype io supports, as a scalar, 0-element and 2-D tensor of seeded random bytes (bool: 0/1).

    ``misalign`` puts a 1-byte tensor first, so every later tensor starts at an odd offset (hand-written files can
    do that; the library's writer never does)."""
    g = torch.Generator().manual_seed(12)
    header: dict[str, dict] = {}
    data = bytearray()

    def add(name: str, dtype: str, shape: list[int], nbytes: int) -> None:
        raw = torch.randint(0, 256 if dtype != "BOOL" else 2, (nbytes,), generator=g, dtype=torch.uint8)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + nbytes]}
        data.extend(raw.numpy().tobytes())

    if misalign:
        add("first", "U8", [1], 1)
    for name, (_dt, bits) in io.SAFETENSORS_DTYPES.items():
        shapes = [[2, 6], [0], [1, 0], [4]] if bits == 4 else [[], [0], [3, 0], [2, 5]]
        for shape in shapes:
            n = 1
            for d in shape:
                n *= d
            add(f"{name}.{'x'.join(map(str, shape)) or 'scalar'}", name, shape, n * bits // 8)
    return write_raw(path, header, bytes(data))


@pytest.mark.parametrize("misalign", [False, True], ids=["aligned", "misaligned"])
def test_every_dtype_is_bit_identical_to_the_library(tmp_path, monkeypatch, misalign):
    p = _every_dtype_file(tmp_path / "all.safetensors", misalign=misalign)
    want = safetensors.torch.load_file(str(p))
    with monkeypatch.context() as m:  # prove the CPU load does not go through the library
        m.setattr(io.safetensors, "safe_open", lambda *a, **k: pytest.fail("used safetensors.safe_open"))
        got, meta = io.load_state_dict(p)
    assert meta == {} and list(got) == list(io.read_safetensors_header(p)[0])
    assert set(got) == set(want)
    for key, w in want.items():
        t = got[key]
        assert t.dtype == w.dtype and t.shape == w.shape and t.device.type == "cpu", key
        assert t.reshape(-1).view(torch.uint8).tolist() == w.reshape(-1).view(torch.uint8).tolist(), key
        assert t.data_ptr() % t.element_size() == 0, f"{key}: misaligned data pointer"


def test_library_path_gives_the_same_tensors(tmp_path, monkeypatch):
    """The path used for other devices and big-endian hosts (safe_open on the checked descriptor) agrees."""
    p = _every_dtype_file(tmp_path / "all.safetensors", misalign=False)
    fast, _ = io.load_state_dict(p)
    monkeypatch.setattr(io, "_LITTLE_ENDIAN", False)
    monkeypatch.setattr(io, "_read_tensors", lambda *a, **k: pytest.fail("used the one-read path"))
    slow, _ = io.load_state_dict(p)
    assert list(slow) == list(fast)
    for key, t in fast.items():
        assert slow[key].dtype == t.dtype and slow[key].shape == t.shape
        assert torch.equal(slow[key].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), key


def test_tensors_are_writable_and_independent_of_the_file(tmp_path, monkeypatch):
    p = tmp_path / "w.safetensors"
    want = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.full((4,), 7, dtype=torch.int32), "c": torch.ones(2)}
    safetensors.torch.save_file(want, str(p))
    before = p.read_bytes()
    with monkeypatch.context() as m, warnings.catch_warnings():
        warnings.simplefilter("error")  # frombuffer warns when its buffer is read-only
        m.setattr(io.safetensors, "safe_open", lambda *a, **k: pytest.fail("used safetensors.safe_open"))
        got, _ = io.load_state_dict(p)
        got["a"].add_(100)  # writable, and writing one tensor touches no other and not the file
    assert torch.equal(got["a"], want["a"] + 100)
    assert torch.equal(got["b"], want["b"]) and torch.equal(got["c"], want["c"])
    assert p.read_bytes() == before
    for t in got.values():  # each tensor's storage is exactly its bytes: saving one saves only it
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    with open(p, "r+b") as f:  # rewritten in place: a mapped tensor would change with it
        f.seek(-8, os.SEEK_END)
        f.write(bytes(8))
    replacement = tmp_path / "new.safetensors"
    safetensors.torch.save_file({"a": torch.zeros(2, 3)}, str(replacement))
    os.replace(replacement, p)  # replaced (Windows refuses this while a mapping is open), then deleted
    p.unlink()
    assert torch.equal(got["b"], want["b"]) and torch.equal(got["c"], want["c"])
    assert torch.equal(got["a"], want["a"] + 100)
    out = tmp_path / "again.safetensors"
    safetensors.torch.save_file(got, str(out))  # no "tensors share memory" refusal
    assert torch.equal(safetensors.torch.load_file(str(out))["a"], want["a"] + 100)


def test_header_parameter_skips_the_second_parse_and_catches_a_changed_file(tmp_path, monkeypatch):
    p = tmp_path / "h.safetensors"
    safetensors.torch.save_file({"w": torch.arange(4.0)}, str(p), metadata={"k": "v"})
    header = io.read_safetensors_header(p)
    with monkeypatch.context() as m:
        m.setattr(io.json, "loads", lambda *a, **k: pytest.fail("the header was parsed again"))
        tensors, meta = io.load_state_dict(p, header=header)
    assert meta == {"k": "v"} and torch.equal(tensors["w"], torch.arange(4.0))
    safetensors.torch.save_file({"w": torch.arange(8.0)}, str(p))  # changed since the header was read
    with pytest.raises(LoraFileError, match="changed after its header was read") as info:
        io.load_state_dict(p, header=header)
    assert info.value.file == str(p)
