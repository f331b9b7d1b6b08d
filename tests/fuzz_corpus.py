"""Seed files, a raw safetensors writer, mutation strategies and the checked property for `tests/test_fuzz.py`.

The property (`check_path`): loading a file either gives a valid LoRA or raises the project's own typed error
(`LoraOpsError`) whose message names the file — never another exception, never a hang, never a dropped key. A
loaded LoRA must also survive what every caller does next: `inspect_lora`, `delta` on every layer, the metadata
consumers of resize/combine, and writing it in every writable format (a `LoraOpsError` where the layer kinds do
not allow it) and reading that back to the same layers.

Everything here is deterministic: seeds come from fixed-seed fixtures, mutations from hypothesis draws.
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import json
import math
import os
import shutil
import signal
import struct
import tempfile
import threading
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import safetensors.torch
import torch
from hypothesis import strategies as st

from lora_ops import io, keymap
from lora_ops.errors import LoraFormatError, LoraOpsError
from lora_ops.files import FOLDER_FILES, load_lora, save_lora
from lora_ops.formats import WRITABLE, names, read_lora, write_lora
from lora_ops.formats.layers import ANY_SUFFIXES, split_key
from lora_ops.inspect import inspect_lora
from lora_ops.lora import LoRA, LoRALayer, LycorisLayer, delta
from lora_ops.testing.fixtures import random_lora

# ------------------------------------------------------------------------------------------- settings / stats

DEFAULT_EXAMPLES = int(os.environ.get("LORAOPS_FUZZ_EXAMPLES", "0") or 0)
"""``LORAOPS_FUZZ_EXAMPLES=N`` runs N examples per fuzz test (a longer local campaign); 0 keeps the CI budget."""

COLLECT = os.environ.get("LORAOPS_FUZZ_COLLECT")
"""``LORAOPS_FUZZ_COLLECT=out.jsonl``: record every violation there and keep going (a census, no shrinking)."""

CASE_TIMEOUT_S = float(os.environ.get("LORAOPS_FUZZ_TIMEOUT", "10"))
"""Hard limit for one case (load + checks); a FIFO or a runaway loop fails the case instead of hanging CI."""

MAX_DELTA_ELEMENTS = 4_000_000
"""`delta` forms the dense ΔW; a valid file may declare factors whose product is huge, so bigger ones are sized only."""

TRACE = os.environ.get("LORAOPS_FUZZ_TRACE")
"""``LORAOPS_FUZZ_TRACE=out.jsonl``: record every case's outcome (to see which code the mutations reach)."""

STATS: Counter[str] = Counter()


def _trace(case: object, outcome: str, message: str = "") -> None:
    if TRACE:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0].split("[")[0]
        with open(TRACE, "a", encoding="utf-8") as f:
            f.write(json.dumps({"test": test, "outcome": outcome, "message": message[:300],
                                "case": repr(case)[:600]}) + "\n")


def examples(ci: int) -> int:
    return DEFAULT_EXAMPLES or ci


# ------------------------------------------------------------------------------------------------ hard timeout


class Hang(BaseException):  # noqa: N818 — a BaseException so the library's `except Exception` cannot swallow it
    """A case ran past `CASE_TIMEOUT_S`."""


@contextlib.contextmanager
def hard_timeout(seconds: float = CASE_TIMEOUT_S) -> Iterator[None]:
    """SIGALRM raises `Hang` in the main thread (this interrupts a blocking open() of a FIFO, too);
    `faulthandler` kills the process with all tracebacks if even that does not come back (a hang inside C)."""
    faulthandler.dump_traceback_later(seconds + 30, exit=True)
    main = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if main:
        def _alarm(signum, frame):
            raise Hang(f"no result after {seconds:g} s")

        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


# ------------------------------------------------------------------------------------- raw safetensors writer


class Raw(str):
    """JSON text spliced into a header or metadata value as is: 10^5-deep nesting, 5000-digit ints, NaN."""

    __slots__ = ()

    def __repr__(self) -> str:
        text = str(self)
        return f"Raw({text!r})" if len(text) <= 40 else f"Raw({text[:16]!r}…{len(text)} chars)"


def emit(value: object) -> str:
    """JSON text of ``value`` with `Raw` pieces kept verbatim (NaN/Infinity as Python's json writes them)."""
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{emit(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(emit(v) for v in value) + "]"
    return json.dumps(value)


@dataclass
class Entry:
    """One header entry: a name, its info object (normally dtype/shape/data_offsets; any JSON when mutated), data."""

    name: str
    info: object
    data: bytes = field(repr=False)


def render(entries: list[Entry], metadata: object | None, *, offsets: str = "fit") -> bytes:
    """A safetensors file: ``offsets="fit"`` rewrites each dict entry's data_offsets to where its data lands;
    ``"keep"`` leaves whatever the entries say (deliberately wrong offsets stay wrong). Data is written in entry
    order. ``metadata`` is any JSON value (or None for no ``__metadata__``); names may repeat."""
    pairs: list[tuple[str, str]] = []
    if metadata is not None:
        pairs.append(("__metadata__", emit(metadata)))
    cursor = 0
    blob = bytearray()
    for e in entries:
        info = e.info
        if offsets == "fit" and isinstance(info, dict):
            info = {**info, "data_offsets": [cursor, cursor + len(e.data)]}
        cursor += len(e.data)
        blob += e.data
        pairs.append((e.name, emit(info)))
    header = ("{" + ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs) + "}").encode("utf-8", "surrogatepass")
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + bytes(blob)


def parse(data: bytes) -> tuple[list[Entry], object | None]:
    """Entries (in data order) and metadata of a valid safetensors file's bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    meta = header.pop("__metadata__", None)
    entries = [Entry(k, v, body[v["data_offsets"][0] : v["data_offsets"][1]]) for k, v in header.items()]
    entries.sort(key=lambda e: e.info["data_offsets"][0])
    return entries, meta


TORCH_TO_ST = {dt: name for name, (dt, _bits) in io.SAFETENSORS_DTYPES.items()}
DTYPE_NAMES = tuple(io.SAFETENSORS_DTYPES)


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def entry_of(name: str, t: torch.Tensor) -> Entry:
    data = tensor_bytes(t)
    return Entry(name, {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [0, len(data)]}, data)


def needed_bytes(dtype: object, shape: object) -> int | None:
    """Bytes a (dtype, shape) pair needs, or None when the pair is not a valid one."""
    if not isinstance(dtype, str) or dtype not in io.SAFETENSORS_DTYPES or not isinstance(shape, list):
        return None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        return None
    bits = io.SAFETENSORS_DTYPES[dtype][1] * math.prod(shape)
    return bits // 8 if bits % 8 == 0 else None


# ------------------------------------------------------------------------------------------------------ seeds

SD1_SHAPES = {
    "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q": (32, 32),
    "unet.input_blocks.1.1.transformer_blocks.0.attn2.to_k": (32, 32),
    "unet.input_blocks.1.1.proj_in": (32, 32, 1, 1),
    "unet.input_blocks.1.0.in_layers.2": (32, 32, 3, 3),
    "unet.output_blocks.3.1.transformer_blocks.0.ff.net.2": (64, 256),
    "unet.middle_block.1.transformer_blocks.0.attn1.to_out.0": (64, 64),
    "unet.time_embed.0": (128, 32),
    "te1.text_model.encoder.layers.0.self_attn.q_proj": (32, 32),
    "te1.text_model.encoder.layers.0.mlp.fc1": (128, 32),
}
SDXL_SHAPES = {
    "unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q": (64, 64),
    "unet.input_blocks.4.1.transformer_blocks.1.attn2.to_v": (64, 64),
    "unet.label_emb.0.0": (128, 80),
    "unet.middle_block.0.in_layers.2": (64, 64, 3, 3),
    "unet.output_blocks.0.1.proj_in": (64, 64),
    "te1.text_model.encoder.layers.0.self_attn.q_proj": (32, 32),
    "te2.text_model.encoder.layers.0.self_attn.k_proj": (32, 32),
    "te2.text_projection": (32, 32),
}
KOHYA_META = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "2",
    "ss_network_alpha": "1.0",
    "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "1", "algo": "lora"}),
    "ss_tag_frequency": json.dumps({"10_sks dog": {"sks": 4, "dog": 3, "grass": 1}}),
    "modelspec.trigger_phrase": "sks",
}


@dataclass(frozen=True)
class Seed:
    name: str
    family: str
    data: bytes = field(repr=False)  # the safetensors file as the library writes it
    config: bytes | None = field(default=None, repr=False)  # adapter_config.json for a PEFT folder

    @property
    def is_folder(self) -> bool:
        return self.config is not None

    def parts(self) -> tuple[list[Entry], dict | None]:
        return parse(self.data)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The seed's tensors in file order (`safetensors.torch.load` returns them in hash order, which varies
        between processes and would make derandomized runs differ)."""
        loaded = safetensors.torch.load(self.data)
        return {e.name: loaded[e.name] for e in self.parts()[0]}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _loha(out_dim: int, in_dim: int, r: int, gen: torch.Generator, *, kernel: int = 0) -> dict[str, torch.Tensor]:
    if not kernel:
        return {"hada_w1_a": torch.randn(out_dim, r, generator=gen), "hada_w1_b": torch.randn(r, in_dim, generator=gen),
                "hada_w2_a": torch.randn(out_dim, r, generator=gen), "hada_w2_b": torch.randn(r, in_dim, generator=gen)}
    # Tucker (LyCORIS use_tucker): t (r, r, kh, kw), a (r, out), b (r, in)
    return {"hada_t1": torch.randn(r, r, kernel, kernel, generator=gen),
            "hada_w1_a": torch.randn(r, out_dim, generator=gen), "hada_w1_b": torch.randn(r, in_dim, generator=gen),
            "hada_t2": torch.randn(r, r, kernel, kernel, generator=gen),
            "hada_w2_a": torch.randn(r, out_dim, generator=gen), "hada_w2_b": torch.randn(r, in_dim, generator=gen)}


def _lyco_lora(family: str) -> dict[str, LoRA]:
    g = _gen(7)
    k = "unet.input_blocks.1.1.transformer_blocks.0."
    conv = "unet.input_blocks.1.0.in_layers.2"
    loha = {
        k + "attn1.to_q": LycorisLayer("loha", _loha(32, 32, 4, g), alpha=2.0),
        conv: LycorisLayer("loha", _loha(32, 32, 2, g, kernel=3), alpha=1.0),
        "te1.text_model.encoder.layers.0.self_attn.q_proj": LycorisLayer("loha", _loha(32, 32, 2, g)),
    }
    lokr = {
        # w1 full (a, b), w2 low-rank: kron → (4·8, 4·8)
        k + "attn1.to_q": LycorisLayer("lokr", {"lokr_w1": torch.randn(4, 4, generator=g),
                                                "lokr_w2_a": torch.randn(8, 2, generator=g),
                                                "lokr_w2_b": torch.randn(2, 8, generator=g)}, alpha=1.0),
        # w1 low-rank, w2 full, no alpha
        k + "attn2.to_k": LycorisLayer("lokr", {"lokr_w1_a": torch.randn(4, 2, generator=g),
                                                "lokr_w1_b": torch.randn(2, 4, generator=g),
                                                "lokr_w2": torch.randn(8, 8, generator=g)}),
        # conv with a Tucker core on w2: t2 (r, r, kh, kw), w2_a (r, c), w2_b (r, d)
        conv: LycorisLayer("lokr", {"lokr_w1": torch.randn(4, 4, generator=g),
                                    "lokr_t2": torch.randn(2, 2, 3, 3, generator=g),
                                    "lokr_w2_a": torch.randn(2, 8, generator=g),
                                    "lokr_w2_b": torch.randn(2, 8, generator=g)}, alpha=2.0),
    }
    return {"loha": LoRA(loha, {"ss_network_module": "lycoris.kohya"}, family=family),
            "lokr": LoRA(lokr, {"ss_network_module": "lycoris.kohya"}, family=family)}


def _locon_dora(family: str) -> dict[str, LoRA]:
    g = _gen(11)
    conv = "unet.input_blocks.1.0.in_layers.2"
    lin = "unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    locon = {
        conv: LoRALayer(down=torch.randn(2, 32, 1, 1, generator=g), up=torch.randn(32, 2, 1, 1, generator=g),
                        mid=torch.randn(2, 2, 3, 3, generator=g), alpha=1.0),
        "unet.input_blocks.1.0.out_layers.3": LoRALayer(down=torch.randn(2, 32, 3, 3, generator=g),
                                                        up=torch.randn(32, 2, 1, 1, generator=g), alpha=2.0),
        lin: LoRALayer(down=torch.randn(2, 32, generator=g), up=torch.randn(32, 2, generator=g), alpha=2.0),
    }
    dora = {
        lin: LoRALayer(down=torch.randn(4, 32, generator=g), up=torch.randn(32, 4, generator=g), alpha=4.0,
                       dora_scale=torch.rand(1, 32, generator=g) + 0.5),
        "te1.text_model.encoder.layers.0.mlp.fc1": LoRALayer(
            down=torch.randn(4, 32, generator=g), up=torch.randn(128, 4, generator=g), alpha=4.0,
            dora_scale=torch.rand(1, 32, generator=g) + 0.5),
    }
    return {"locon": LoRA(locon, dict(KOHYA_META), family=family), "dora": LoRA(dora, {}, family=family)}


def _varied_alphas(lora: LoRA) -> LoRA:
    """Different alphas on some layers, so the diffusers/PEFT configs carry alpha_pattern entries."""
    return lora.map_layers(lambda k, ly: LoRALayer(ly.down, ly.up, alpha=(4.0 if "attn1" in k else 1.0)))


@functools.cache
def seeds() -> dict[str, Seed]:
    """Every format, written by the library itself (`save_lora`), read back as bytes."""
    out: dict[str, Seed] = {}
    folder = Path(tempfile.mkdtemp(prefix="lora-fuzz-seeds-", dir=scratch_root()))
    try:
        sd1 = random_lora(SD1_SHAPES, rank=2, alpha=1.0, family="sd1", seed=1, metadata=KOHYA_META)
        sdxl = random_lora(SDXL_SHAPES, rank=2, alpha=1.0, family="sdxl", seed=2, dtype=torch.float16,
                           metadata=KOHYA_META)
        unet_only = sd1.map_layers(lambda k, ly: ly if k.startswith("unet.") else None)
        plan: list[tuple[str, str, LoRA, str, dict]] = [
            ("kohya_sd1", "sd1", sd1, "kohya", {}),
            ("kohya_sdxl_fp16", "sdxl", sdxl, "kohya", {}),
            ("comfyui_sdxl", "sdxl", sdxl, "comfyui", {}),
            ("comfyui_sd1", "sd1", sd1, "comfyui", {}),
            ("diffusers_sd1", "sd1", _varied_alphas(sd1), "diffusers", {}),
            ("diffusers_sdxl", "sdxl", _varied_alphas(sdxl), "diffusers", {}),
            ("peft_unet", "sd1", _varied_alphas(unet_only), "peft", {}),
            ("peft_te", "sd1", sd1, "peft", {"component": "text_encoder"}),
        ]
        plan += [(f"lycoris_{n}", "sd1", lo, "kohya", {}) for n, lo in _lyco_lora("sd1").items()]
        plan += [(n, "sd1", lo, "kohya", {}) for n, lo in _locon_dora("sd1").items()]
        for name, family, lora, fmt, options in plan:
            path = save_lora(lora, folder / f"{name}.safetensors", fmt, **options)
            out[name] = Seed(name, family, path.read_bytes())
        # A PEFT adapter folder as PEFT's save_pretrained writes it: weights + adapter_config.json beside them.
        entries, meta = out["peft_unet"].parts()
        config = json.loads(meta.pop("adapter_config"))
        meta.pop("lora_ops.component")
        config.update({"peft_type": "LORA", "task_type": None, "base_model_name_or_path": "tiny-sd"})
        out["peft_folder"] = Seed("peft_folder", "sd1", render(entries, meta),
                                  json.dumps(config, indent=2).encode())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def seed_names(*, folders: bool = True) -> list[str]:
    return [n for n, s in seeds().items() if folders or not s.is_folder]


@functools.cache
def scratch_root() -> str | None:
    """/dev/shm when it exists (saves fsync; fuzzing writes thousands of files), else the default temp dir."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


# ------------------------------------------------------------------------------------------------- the check


class Violation(AssertionError):
    pass


@dataclass
class Outcome:
    kind: str  # "loaded" | "refused"
    detail: str = ""


def _record(kind: str, step: str, err: BaseException | None, message: str, case: object) -> None:
    STATS[f"violation:{kind}"] += 1
    where = ""
    if err is not None:
        frames = [f for f in traceback.extract_tb(err.__traceback__) if "lora_ops" in f.filename]
        if frames:
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0]
    row = {"test": test, "kind": kind, "step": step, "type": type(err).__name__ if err else None, "where": where,
           "message": message[:400], "case": repr(case)[:2000]}
    with open(COLLECT, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _violate(kind: str, step: str, message: str, case: object, err: BaseException | None = None) -> None:
    """Report a broken property: recorded (collect mode) or raised. A foreign exception is re-raised itself so
    hypothesis tells distinct bugs apart by where they come from."""
    if COLLECT:
        _record(kind, step, err, message, case)
        return
    STATS[f"violation:{kind}"] += 1
    if err is not None and kind in ("foreign-exception", "hang"):
        err.add_note(f"lora-ops fuzz: {kind} during {step}: {message}")
        raise err
    raise Violation(f"{kind} during {step}: {message}") from err


def _names_file(err: LoraOpsError, path: Path) -> bool:
    return str(path) in str(err)


def weights_file(path: Path) -> Path:
    if path.is_dir():
        for name in FOLDER_FILES:
            if (path / name).is_file():
                return path / name
    return path


def check_path(path: str | Path, case: object = None, *, family: str | None = None,
               timeout: float = CASE_TIMEOUT_S) -> Outcome:
    """The fuzz property for one file (or folder); returns what happened, raises `Violation` when it breaks."""
    path = Path(path)
    STATS["cases"] += 1
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0].split("[")[0]
    if test:
        STATS[f"cases in {test}"] += 1
    step = "load_lora"
    try:
        with hard_timeout(timeout):
            try:
                lora = load_lora(path, family=family)
            except LoraOpsError as err:
                STATS[f"refused:{type(err).__name__}"] += 1
                _trace(case, f"refused:{type(err).__name__}", err.reason)
                if not _names_file(err, path):
                    _violate("error-without-path", step, f"{type(err).__name__}: {err}", case, err)
                    return Outcome("refused", str(err))
                if isinstance(err, LoraFormatError) and "not understood" in str(err):
                    step = "lenient accounting"
                    _check_lenient(path, case, family)
                return Outcome("refused", str(err))
            STATS["loaded"] += 1
            _trace(case, "loaded")
            step = "accounting"
            _check_accounting(lora, path, case)
            _check_loaded(lora, path, case)
            return Outcome("loaded")
    except Violation:
        raise
    except Hang as err:
        _violate("hang", step, str(err), case, err)
    except Exception as err:
        _violate("foreign-exception", step, f"{type(err).__name__}: {err}", case, err)
    return Outcome("violation")


def _fingerprint(t: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    return str(t.dtype), tuple(t.shape), tensor_bytes(t)


def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors, _meta = io.load_state_dict(weights_file(path))
    return tensors


def _check_accounting(lora: LoRA, path: Path, case: object, unused: list[str] | None = None) -> None:
    """Every tensor of the file is in exactly one layer (alphas as the layer's alpha), or listed as unused."""
    file_tensors = _file_tensors(path)
    (n,) = struct.unpack("<Q", weights_file(path).read_bytes()[:8])
    header_keys = [k for k in json.loads(weights_file(path).read_bytes()[8 : 8 + n]) if k != "__metadata__"]
    if len(header_keys) != len(file_tensors):
        _violate("dropped-key", "load_state_dict", f"header has {len(header_keys)} tensors, "
                 f"load_state_dict returned {len(file_tensors)}", case)
        return
    unused = set(unused or ())
    alpha_keys = [k for k in file_tensors if k.endswith(".alpha") and k not in unused]
    in_file = Counter(_fingerprint(t) for k, t in file_tensors.items() if k not in unused and k not in alpha_keys)
    in_layers = Counter(_fingerprint(t) for layer in lora.layers.values() for t in layer.tensors().values())
    file_alphas = Counter(float(file_tensors[k].double().reshape(-1)[0]) for k in alpha_keys
                          if file_tensors[k].numel() == 1)
    layer_alphas = Counter(layer.alpha for layer in lora.layers.values() if layer.alpha is not None)
    missing = in_file - in_layers
    extra = in_layers - in_file
    alpha_missing = file_alphas - layer_alphas
    if missing or extra or alpha_missing:
        total = sum(len(ly.tensors()) for ly in lora.layers.values())
        _violate("dropped-key", "accounting",
                 f"file has {len(file_tensors)} tensors ({len(alpha_keys)} alphas, {len(unused)} listed unused); "
                 f"the {len(lora.layers)} layers hold {total} tensors + {sum(layer_alphas.values())} alphas; "
                 f"{sum(missing.values())} file tensor(s) and {sum(alpha_missing.values())} alpha(s) are in no "
                 f"layer, {sum(extra.values())} layer tensor(s) come from nowhere", case)


def _check_lenient(path: Path, case: object, family: str | None = None) -> None:
    """strict=False keeps what it understands and lists the rest; together they must be the whole file."""
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return  # the folder's config reaches read_lora through files.load_lora only
    tensors, meta = io.load_state_dict(weights_file(path))
    extra: dict[str, str] = {}
    try:
        lora, unused = read_lora(tensors, {**extra, **meta}, family=family, file=str(path), strict=False)
    except LoraOpsError as err:
        if not _names_file(err, path):
            _violate("error-without-path", "read_lora(strict=False)", f"{type(err).__name__}: {err}", case, err)
        return
    _check_accounting(lora, path, case, unused=unused)


def _meta_delta_numel(layer) -> int | None:
    """ΔW's element count from shapes alone (meta tensors), or None when the shapes do not even combine."""
    try:
        meta = layer.with_tensors({n: torch.empty(t.shape, dtype=torch.float32, device="meta")
                                   for n, t in layer.tensors().items()})
        return delta(meta).numel()
    except Exception:
        return None


def _check_loaded(lora: LoRA, path: Path, case: object) -> None:
    step = "inspect_lora"
    try:
        report = inspect_lora(lora, path)
        json.dumps(report)
    except LoraOpsError as err:
        if not _names_file(err, path):
            _violate("error-without-path", step, f"{type(err).__name__}: {err}", case, err)
    except Exception as err:
        _violate("foreign-exception", step, f"{type(err).__name__}: {err}", case, err)
    for key, layer in lora.layers.items():
        step = f"delta({key})"
        if layer.alpha is not None and not (isinstance(layer.alpha, float) and math.isfinite(layer.alpha)):
            _violate("loaded-invalid-layer", f"alpha of {key}", f"alpha is {layer.alpha!r}", case)
        numel = _meta_delta_numel(layer)
        if numel is not None and numel > MAX_DELTA_ELEMENTS:
            STATS["delta skipped (huge ΔW)"] += 1
            continue
        try:
            d = delta(layer)
        except Exception as err:  # a loaded layer is valid: even a LoraOpsError here means load let it through
            _violate("loaded-invalid-layer", step, f"{type(err).__name__}: {err}", case, err)
            continue
        if d.dtype != torch.float32 or d.ndim not in (2, 4):
            _violate("loaded-invalid-layer", step, f"ΔW is {d.dtype} of shape {tuple(d.shape)}", case)
    _check_metadata_consumers(lora, case)
    _check_writes(lora, path, case)


def _check_metadata_consumers(lora: LoRA, case: object) -> None:
    """resize and combine rewrite ss_network_args / ss_tag_frequency of whatever file they were given."""
    from lora_ops import combine, resize

    consumers: list[tuple[str, Callable[[], object]]] = [
        ("resize.updated_metadata", lambda: resize.updated_metadata(lora.metadata, lora, "fuzz")),
    ]
    if hasattr(combine, "_merge_metadata"):
        consumers.append(("combine._merge_metadata", lambda: combine._merge_metadata([lora.metadata, lora.metadata])))
    for step, fn in consumers:
        try:
            fn()
        except LoraOpsError:
            pass
        except Exception as err:
            _violate("foreign-exception", step, f"{type(err).__name__}: {err}", case, err)


def _writable_kinds(layers, fmt: str) -> bool:
    if fmt in ("kohya", "comfyui"):
        return True
    return all(isinstance(ly, LoRALayer) and ly.mid is None and ly.dora_scale is None for ly in layers.values())


def _write_jobs(lora: LoRA) -> list[tuple[str, dict]]:
    jobs = []
    for fmt in WRITABLE:
        if fmt == "peft":
            comps = sorted({ {"unet": "unet", "te1": "text_encoder", "te2": "text_encoder_2"}.get(k.split(".")[0], "?")
                             for k in lora.layers})
            jobs += [(fmt, {"component": c}) for c in comps]
        else:
            jobs.append((fmt, {}))
    return jobs


def _check_writes(lora: LoRA, path: Path, case: object) -> None:
    _check_file_round_trip(lora, path, case)
    for fmt, options in _write_jobs(lora):
        step = f"write_lora({fmt}{', ' + options['component'] if options else ''})"
        try:
            tensors, metadata = write_lora(lora, fmt, **options)
        except LoraOpsError:
            STATS[f"write refused:{fmt}"] += 1
            continue
        except Exception as err:
            _violate("foreign-exception", step, f"{type(err).__name__}: {err}", case, err)
            continue
        expected = lora.layers
        if fmt == "peft":
            part = {"unet": "unet", "text_encoder": "te1", "text_encoder_2": "te2"}[options["component"]]
            expected = {k: ly for k, ly in lora.layers.items() if k.split(".")[0] == part}
        if not _writable_kinds(expected, fmt):
            _violate("wrote-unwritable", step, "wrote layers this format cannot hold", case)
            continue
        step = f"read back {fmt}"
        try:
            back, unused = read_lora(tensors, metadata, family=lora.family, file=f"<written {fmt}>", strict=True)
        except LoraOpsError as err:
            _violate("unreadable-output", step, f"{type(err).__name__}: {err}", case, err)
            continue
        except Exception as err:
            _violate("foreign-exception", step, f"{type(err).__name__}: {err}", case, err)
            continue
        problem = _layers_differ(expected, back.layers)
        if problem:
            _violate("round-trip-mismatch", step, problem, case)


def _check_file_round_trip(lora: LoRA, path: Path, case: object) -> None:
    """kohya format holds every layer kind: save it to a file and load that file back to the same layers."""
    out = Path(tempfile.mkdtemp(prefix="lora-fuzz-out-", dir=scratch_root())) / "back.safetensors"
    try:
        step = "save_lora(kohya)"
        try:
            save_lora(lora, out, "kohya")
        except LoraOpsError as err:  # e.g. a wrong family hint: the kohya writer cannot spell a module
            STATS["save refused:kohya"] += 1
            if str(out) not in str(err):
                _violate("save-error-without-path", step, f"{type(err).__name__}: {err}", case, err)
            return
        step = "load_lora(saved kohya file)"
        try:
            back = load_lora(out, family=lora.family)
        except LoraOpsError as err:
            _violate("unreadable-output", step, f"{type(err).__name__}: {err}", case, err)
            return
        problem = _layers_differ(lora.layers, back.layers)
        if problem:
            _violate("round-trip-mismatch", step, problem, case)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


def _layers_differ(a, b) -> str | None:
    if set(a) != set(b):
        return f"keys differ: only before {sorted(set(a) - set(b))[:3]}, only after {sorted(set(b) - set(a))[:3]}"
    for key, la in a.items():
        lb = b[key]
        if type(la) is not type(lb) or la.kind != lb.kind:
            return f"{key}: kind {la.kind} became {lb.kind}"
        ta, tb = la.tensors(), lb.tensors()
        if set(ta) != set(tb):
            return f"{key}: roles {sorted(ta)} became {sorted(tb)}"
        for role, t in ta.items():
            if _fingerprint(t) != _fingerprint(tb[role]):
                return f"{key}.{role}: tensor changed ({t.dtype} {tuple(t.shape)} → {tb[role].dtype} " \
                       f"{tuple(tb[role].shape)})"
        sa, sb = la.scale, lb.scale
        if not (sa == sb or math.isclose(sa, sb, rel_tol=1e-6) or (math.isnan(sa) and math.isnan(sb))):
            return f"{key}: scale {sa} became {sb}"
    return None


# ------------------------------------------------------------------------------------------- case materialising


class Scratch:
    """One folder per test for the case files; each case overwrites the last."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lora-fuzz-", dir=scratch_root()))
        self.n = 0

    def write(self, data: bytes, config: bytes | None = None, *, config_path: str = "adapter_config.json") -> Path:
        self.clear()
        self.n += 1
        if config is None:
            path = self.root / "case.safetensors"
            path.write_bytes(data)
            return path
        folder = self.root / "case_adapter"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(data)
        (folder / config_path).write_bytes(config)
        return folder

    def clear(self) -> None:
        for child in self.root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------------------------- weird JSON values

DEEP = 100_000
DEEP_LIST = Raw("[" * DEEP + "]" * DEEP)
DEEP_DICT = Raw('{"a":' * DEEP + "1" + "}" * DEEP)
HUGE_INT = Raw("1" + "0" * 5000)  # 10**5000: past Python's int-parsing digit limit
BIG_INT = Raw("1" + "0" * 400)  # 10**400: parses, but float() overflows
WEIRD_NUMBERS = (Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e400"), Raw("-1e400"), BIG_INT, HUGE_INT,
                 Raw("-" + "9" * 400), 0, -1, 2**63, 2**64, 1e-320, -0.0, 1.5,
                 3.5e38, -1e39, 65520.0, 1.7976931348623157e308)  # past the fp32 / fp16 range, the largest double
WEIRD_VALUES = WEIRD_NUMBERS + (DEEP_LIST, DEEP_DICT, None, True, False, "", "abc", "4", "NaN", [], [1, 2], ["a"],
                                {}, {"a": 1}, {"a": Raw("NaN")}, [[[]]], Raw("[" * 900 + "]" * 900))
WEIRD_TEXTS = (
    "", "null", "true", "[]", "[1,2]", '"str"', "{", "{}}", "{'a': 1}", '{"a":1,"a":2}', "\x00", "NaN", "Infinity",
    "1e400", str(BIG_INT), str(HUGE_INT), str(DEEP_LIST), str(DEEP_DICT), '"\\ud800"', "[" * 900 + "]" * 900,
    '{"a": ' + "[" * 5000 + "]" * 5000 + "}",
)


def json_values(depth: int = 2) -> st.SearchStrategy:
    """Plain JSON values mixed with the weird ones above."""
    leaf = st.one_of(st.sampled_from(WEIRD_VALUES), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                     st.text(max_size=8))
    return st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                        max_leaves=6)


# ------------------------------------------------------------------------------------------ alias spellings


def alias_spellings(key: str, family: str) -> list[str]:
    """Other spellings of a tensor key that some reader maps to the same canonical module (and role)."""
    split = split_key(key, ANY_SUFFIXES)
    if split is None:
        return []
    module, _role = split
    suffix = key[len(module):]
    out: list[str] = []

    def unet_alts(path: str) -> list[str]:
        fn = keymap.unet_diffusers_to_ldm if names.is_diffusers_unet_path(path) else keymap.unet_ldm_to_diffusers
        try:
            return [fn(path, family)]
        except LoraOpsError:
            return []

    def te_alts(path: str) -> list[str]:
        return [path.removeprefix("text_model.")] if path.startswith("text_model.") else ["text_model." + path]

    if module.startswith("lora_unet_"):
        path = keymap.kohya_to_dotted(module[len("lora_unet_"):])
        out += ["lora_unet_" + keymap.dotted_to_kohya(p) for p in unet_alts(path)]
    elif module.startswith(("lora_te_", "lora_te1_", "lora_te2_")):
        prefix, rest = module.split("_", 2)[:2], module.split("_", 2)[2]
        prefix = "_".join(prefix) + "_"
        if prefix in ("lora_te_", "lora_te1_"):
            out.append(("lora_te1_" if prefix == "lora_te_" else "lora_te_") + rest)
        path = keymap.kohya_to_dotted(rest)
        out += [prefix + keymap.dotted_to_kohya(p) for p in te_alts(path)]
    elif module.startswith("diffusion_model."):
        out += ["diffusion_model." + p for p in unet_alts(module[len("diffusion_model."):])]
    elif module.startswith("text_encoders."):
        head, _, path = module.partition(".transformer.")
        out += [f"{head}.transformer.{p}" for p in te_alts(path)]
    elif module.startswith("unet."):
        path = module[len("unet."):]
        out += ["unet." + p for p in unet_alts(path)] + ["unet.processor." + path]
    elif module.startswith(("text_encoder.", "text_encoder_2.")):
        comp, _, path = module.partition(".")
        out += [f"{comp}.{p}" for p in te_alts(path)]
    elif module.startswith("base_model.model."):
        path = module[len("base_model.model."):]
        alts = te_alts(path) if path.startswith(("text_model.", "encoder.")) else unet_alts(path)
        out += ["base_model.model." + p for p in alts]
    spellings = [m + suffix for m in out]
    # The same role under another suffix spelling (lora_A ↔ lora.down; ComfyUI reads every spelling).
    role_alts = {".lora_A.weight": [".lora.down.weight"], ".lora.down.weight": [".lora_A.weight"],
                 ".lora_B.weight": [".lora.up.weight"], ".lora.up.weight": [".lora_B.weight"]}
    if module.startswith(("diffusion_model.", "text_encoders.")):
        role_alts.update({".lora_down.weight": [".lora_A.weight", ".lora.down.weight"],
                          ".lora_up.weight": [".lora_B.weight", ".lora.up.weight"]})
    spellings += [module + s for s in role_alts.get(suffix, [])]
    return [s for s in spellings if s != key]


def module_of(key: str) -> str:
    split = split_key(key, ANY_SUFFIXES)
    return split[0] if split else key
