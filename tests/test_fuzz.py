"""Standing robustness fuzz of every reader (issue 12): mutate valid files of every format, load them.

Property (see `tests/fuzz_corpus.py::check_path`): each outcome is a valid LoRA — every tensor of the file in a
layer, and `inspect_lora`, `delta` of every layer, the resize/combine metadata consumers and writing it out in
every writable format (read back to the same layers) all work — or a `LoraOpsError` whose message names the file.
Never another exception, a hang (every case runs under a hard timeout) or a dropped key.

Seeds are small files the library writes itself: kohya SD1 and SDXL (fp16), ComfyUI, diffusers with
`lora_adapter_metadata`, PEFT with `adapter_config` metadata and as an adapter folder, LyCORIS LoHa / LoKr (with
Tucker parts), LoCon (conv + mid) and DoRA. Mutations: raw header bytes, header JSON fields, metadata JSON values,
alias spellings of a module, keys of two formats in one file, tensor values / dtypes / shapes, and special files
(FIFO, folder, /dev/null, symlink loops, sockets, 20k junk tensors, 20 MB metadata, pickles, LFS pointers …).

Runs derandomized (the same examples every run) in well under a minute on one thread; set
``LORAOPS_FUZZ_EXAMPLES=N`` for N examples per test (a longer local campaign) and ``LORAOPS_FUZZ_COLLECT=f.jsonl``
to record every violation without stopping (a census of failure classes; no shrinking).
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time

import fuzz_corpus as fc
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_ops.io import MAX_HEADER_BYTES

pytestmark = pytest.mark.filterwarnings("ignore")  # complex → real casts in delta warn; that is not a failure

FUZZ = dict(deadline=None, derandomize=True, database=None, print_blob=False,
            suppress_health_check=list(HealthCheck))


def fuzz(ci_examples: int):
    return settings(max_examples=fc.examples(ci_examples), **FUZZ)


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    start = time.perf_counter()
    yield
    took = time.perf_counter() - start
    stats = fc.STATS
    line = (f"lora-ops fuzz: {stats['cases']} cases in {took:.1f} s — {stats['loaded']} loaded, "
            f"{sum(v for k, v in stats.items() if k.startswith('refused:'))} refused with a typed error, "
            f"{sum(v for k, v in stats.items() if k.startswith('violation:'))} violations")
    per_test = ", ".join(f"{k.removeprefix('cases in ')} {v}" for k, v in stats.items() if k.startswith("cases in "))
    detail = ", ".join(f"{k} {v}" for k, v in sorted(stats.items()) if ":" in k)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line, per_test, detail)
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        for text in (line, f"  cases per test: {per_test}", f"  outcomes: {detail}"):
            reporter.write_line(text)


@pytest.fixture(scope="module")
def scratch():
    s = fc.Scratch()
    yield s
    s.close()


SEEDS = fc.seed_names()
FAMILIES = st.sampled_from((None, None, None, "sd1", "sdxl"))  # mostly detected; sometimes a (wrong) hint


def _write(scratch: fc.Scratch, seed: fc.Seed, data: bytes):
    return scratch.write(data, seed.config)


# ------------------------------------------------------------------------------------------------------- seeds


@pytest.mark.parametrize("name", SEEDS)
def test_seed_is_a_valid_lora(name, scratch):
    """Every seed loads, with all its tensors in layers, and survives inspect / delta / writing back out."""
    seed = fc.seeds()[name]
    assert fc.check_path(_write(scratch, seed, seed.data), name, family=None).kind == "loaded"


def _kind(layer) -> str:
    if getattr(layer, "dora_scale", None) is not None:
        return "dora"
    return "mid" if getattr(layer, "mid", None) is not None else layer.kind


def test_seed_formats_cover_every_reader():
    from lora_ops.files import load_lora

    kinds = {}
    s = fc.Scratch()
    try:
        for name, seed in fc.seeds().items():
            lora = load_lora(s.write(seed.data, seed.config))
            kinds[name] = (lora.source_format, lora.family, {_kind(ly) for ly in lora.layers.values()})
    finally:
        s.close()
    assert {f for f, _, _ in kinds.values()} == {"kohya", "lycoris", "comfyui", "diffusers", "peft"}
    assert kinds["kohya_sdxl_fp16"][1] == "sdxl" and kinds["kohya_sd1"][1] == "sd1"
    assert {"loha", "lokr", "mid", "dora"} <= set().union(*(k for _, _, k in kinds.values()))
    lokr = fc.seeds()["lycoris_lokr"].parts()[0]
    assert any(e.name.endswith(".lokr_t2") for e in lokr)
    assert any(e.name.endswith(".hada_t1") for e in fc.seeds()["lycoris_loha"].parts()[0])


# ---------------------------------------------------------------------------------------------- raw bytes

POS = st.one_of(st.integers(0, 24), st.integers(0, 2048), st.integers(0, 1 << 16))
PREFIX_VALUES = (0, 1, 2, 7, 8, MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1, 2**32, 2**63, 2**64 - 1)
RAW_OPS = st.one_of(
    st.tuples(st.just("flip"), POS, st.integers(0, 7)),
    st.tuples(st.just("set"), POS, st.sampled_from(b'{}[]",:0\x00\xff\xc3 "')),
    st.tuples(st.just("insert"), POS,
              st.one_of(st.sampled_from([b"{", b"}", b'"', b",", b"\x00", b"\xff", b"\xc3", b"  ", b"-", b"e9"]),
                        st.binary(min_size=1, max_size=8))),
    st.tuples(st.just("delete"), POS, st.integers(1, 16)),
    st.tuples(st.just("truncate"), POS),
    st.tuples(st.just("prefix="), st.one_of(st.sampled_from(PREFIX_VALUES), st.integers(0, 2**64 - 1))),
    st.tuples(st.just("prefix+"), st.integers(-64, 64)),
)


def apply_raw(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op in ops:
        kind = op[0]
        if kind.startswith("prefix"):
            (n,) = struct.unpack("<Q", bytes(buf[:8]).ljust(8, b"\0"))
            n = op[1] if kind == "prefix=" else min(max(n + op[1], 0), 2**64 - 1)
            buf[:8] = struct.pack("<Q", n)
            continue
        pos = op[1] % (len(buf) + 1)
        if kind == "flip" and pos < len(buf):
            buf[pos] ^= 1 << op[2]
        elif kind == "set" and pos < len(buf):
            buf[pos] = op[2]
        elif kind == "insert":
            buf[pos:pos] = op[2]
        elif kind == "delete":
            del buf[pos : pos + op[2]]
        elif kind == "truncate":
            del buf[pos:]
    return bytes(buf)


@fuzz(500)
@given(data=st.data())
def test_fuzz_raw_header_bytes(data, scratch):
    name = data.draw(st.sampled_from(SEEDS), label="seed")
    ops = data.draw(st.lists(RAW_OPS, min_size=1, max_size=3), label="ops")
    seed = fc.seeds()[name]
    fc.check_path(_write(scratch, seed, apply_raw(seed.data, ops)), (name, ops))


# -------------------------------------------------------------------------------------------- header fields

BAD_DTYPES = ("F6_E2M3", "F6_E3M2", "Q4_0", "f32", "float32", "", "F32 ", "F8", "I128", "C128", "U1")
SHAPE_EDITS = ("0-dim", "flat", "extra-dim", "extra-leading", "drop-dim", "transpose", "zero-dim", "double-first")
OFFSET_EDITS = ("swap", "shift", "grow", "shrink", "overlap-prev", "copy-other", "past-end", "single", "triple",
                "floats", "negative", "huge", "string", "null", "bool")
WEIRD_SHAPES = ([-1], [2**63], [2**64], [1.0], [True], "4", None, [[4]], [fc.Raw("1e400")], [fc.HUGE_INT],
                [fc.Raw("NaN")], [4, -4], [0] * 40, {"0": 4})
HEADER_OPS = st.one_of(
    st.tuples(st.just("dtype"), st.integers(0, 99),
              st.one_of(st.sampled_from(fc.DTYPE_NAMES + BAD_DTYPES), st.sampled_from((3, None, ["F32"], True)))),
    st.tuples(st.just("shape"), st.integers(0, 99),
              st.one_of(st.sampled_from(SHAPE_EDITS), st.sampled_from(WEIRD_SHAPES),
                        st.lists(st.integers(0, 70), max_size=5))),
    st.tuples(st.just("offsets"), st.integers(0, 99), st.sampled_from(OFFSET_EDITS), st.integers(1, 64)),
    st.tuples(st.just("drop-field"), st.integers(0, 99), st.sampled_from(("dtype", "shape", "data_offsets"))),
    st.tuples(st.just("add-field"), st.integers(0, 99), st.sampled_from(("extra", "dtype2", "")),
              fc.json_values()),
    st.tuples(st.just("info"), st.integers(0, 99), fc.json_values()),
    st.tuples(st.just("rename"), st.integers(0, 99),
              st.sampled_from(("", "__metadata__", "x", "{dup}", "{name}.weight", "{name}x", "lora_unet_",
                               "lora_unet_.alpha", "lora_unet__a.lora_down.weight", "\ud800.alpha",
                               "unet..lora_A.weight", "base_model.model..lora_A.weight"))),
    st.tuples(st.just("dup"), st.integers(0, 99)),
    st.tuples(st.just("remove"), st.integers(0, 99)),
    st.tuples(st.just("metadata"), fc.json_values()),
)


def _shape_edit(shape: list, how: str) -> list:
    if how == "0-dim":
        return []
    if how == "flat":
        return [int(torch.tensor(shape).prod())] if shape else [1]
    if how == "extra-dim":
        return shape + [1]
    if how == "extra-leading":
        return [1] + shape
    if how == "drop-dim":
        return shape[:-1]
    if how == "transpose":
        return shape[::-1]
    if how == "zero-dim":
        return shape[:-1] + [0] if shape else [0]
    if how == "double-first":
        return [shape[0] * 2] + shape[1:] if shape else [2]
    raise AssertionError(how)


def _pair(info: object) -> list[int] | None:
    """An entry's data_offsets when they still are a pair of ints (an earlier edit may have broken them)."""
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets):
        return offsets
    return None


def _offsets_edit(entries: list, i: int, how: str, k: int, data_len: int) -> object:
    b, e = _pair(entries[i].info)
    other_offsets = _pair(entries[(i + 1) % len(entries)].info) or [0, 4]
    prev_end = (_pair(entries[i - 1].info) or [0, 0])[1] if i else 0
    return {
        "swap": [e, b], "shift": [b + k, e + k], "grow": [b, e + k], "shrink": [b, max(b, e - k)],
        "overlap-prev": [max(prev_end - k, 0), max(prev_end - k, 0) + (e - b)], "copy-other": list(other_offsets),
        "past-end": [b, data_len + k], "single": [b], "triple": [b, e, e], "floats": [float(b), float(e)],
        "negative": [-k, e], "huge": [2**64 - k, 2**64], "string": f"{b},{e}", "null": None, "bool": [False, True],
    }[how]


def apply_header(entries: list, metadata, ops) -> tuple[list, object, set[int]]:
    """Apply header edits in place; returns the entries, metadata and the indices whose dtype/shape changed."""
    touched: set[int] = set()
    data_len = sum(len(e.data) for e in entries)
    for op in ops:
        if op[0] == "metadata":
            metadata = op[1]
            continue
        if not entries:
            break
        i = op[1] % len(entries)
        e = entries[i]
        info = e.info if isinstance(e.info, dict) else {}
        kind = op[0]
        if kind == "dtype":
            e.info = {**info, "dtype": op[2]}
            touched.add(id(e))
        elif kind == "shape":
            shape = info.get("shape")
            value = op[2]
            if isinstance(value, str) and value in SHAPE_EDITS:
                value = _shape_edit(list(shape) if isinstance(shape, list) else [], value)
            e.info = {**info, "shape": value}
            touched.add(id(e))
        elif kind == "offsets" and _pair(info):
            e.info = {**info, "data_offsets": _offsets_edit(entries, i, op[2], op[3], data_len)}
        elif kind == "drop-field":
            e.info = {k: v for k, v in info.items() if k != op[2]}
        elif kind == "add-field":
            e.info = {**info, op[2]: op[3]}
        elif kind == "info":
            e.info = op[2]
        elif kind == "rename":
            e.name = op[2].replace("{dup}", entries[(i + 1) % len(entries)].name).replace("{name}", e.name)
        elif kind == "dup":
            entries.insert(i + 1, fc.Entry(e.name, dict(info), e.data))
        elif kind == "remove":
            del entries[i]
    return entries, metadata, touched


FILLS = ("zeros", "ones", "ff", "repeat", "counting")


def refill(entry: fc.Entry, fill: str) -> None:
    """New data bytes exactly as long as the entry's dtype/shape need (when that is a sane size)."""
    info = entry.info if isinstance(entry.info, dict) else {}
    need = fc.needed_bytes(info.get("dtype"), info.get("shape"))
    if need is None or need > 1 << 20:
        return
    if fill == "zeros":
        entry.data = bytes(need)
    elif fill == "ones":  # 1.0 in whatever float dtype this is not; a plain non-zero pattern
        entry.data = b"\x3c" * need
    elif fill == "ff":  # NaN in every IEEE float width
        entry.data = b"\xff" * need
    elif fill == "counting":
        entry.data = bytes(i % 251 for i in range(need))
    else:
        src = entry.data or b"\x01"
        entry.data = (src * (need // len(src) + 1))[:need]


@fuzz(500)
@given(data=st.data())
def test_fuzz_header_fields(data, scratch):
    name = data.draw(st.sampled_from(SEEDS), label="seed")
    ops = data.draw(st.lists(HEADER_OPS, min_size=1, max_size=3), label="ops")
    mode = data.draw(st.sampled_from(("fit+data", "fit", "keep")), label="offsets")
    seed = fc.seeds()[name]
    entries, metadata = seed.parts()
    entries, metadata, touched = apply_header(entries, metadata, ops)
    if mode == "fit+data":
        fill = data.draw(st.sampled_from(FILLS), label="fill")
        for e in entries:
            if id(e) in touched:
                refill(e, fill)
    blob = fc.render(entries, metadata, offsets="keep" if mode == "keep" else "fit")
    family = data.draw(FAMILIES, label="family")
    fc.check_path(_write(scratch, seed, blob), (name, ops, mode), family=family)


# ------------------------------------------------------------------------------------------- metadata values

META_FIELDS = {
    "lora_adapter_metadata": ("unet.lora_alpha", "unet.alpha_pattern", "unet.r", "unet.rank_pattern",
                              "text_encoder.lora_alpha", "text_encoder.alpha_pattern", "unet.target_modules",
                              "unet.use_dora", "text_encoder_2.lora_alpha"),
    "adapter_config": ("lora_alpha", "alpha_pattern", "r", "rank_pattern", "target_modules", "use_dora",
                       "use_rslora"),
    "ss_tag_frequency": ("10_sks dog", "other folder"),
    "ss_network_args": ("conv_dim", "conv_alpha", "algo", "dropout"),
}
META_TEMPLATES = {
    "lora_adapter_metadata": {"unet.r": 2, "unet.lora_alpha": 1.0, "text_encoder.r": 2, "text_encoder.lora_alpha": 1},
    "adapter_config": {"r": 2, "lora_alpha": 1.0, "target_modules": ["to_q"]},
    "ss_tag_frequency": {"10_sks dog": {"sks": 4, "dog": 3}},
    "ss_network_args": {"conv_dim": "2", "conv_alpha": "1"},
}
PATTERN_TARGETS = ("attn1.to_q", "to_q", "attn2.to_k", "self_attn.q_proj", "mlp.fc1", "proj_in", "label_emb.0.0",
                   "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "q_proj", "")
META_KEYS = tuple(META_FIELDS) + ("lora_ops.component", "format", "modelspec.trigger_phrase", "ss_network_alpha",
                                  "ss_trigger_words", "ss_network_dim", "")

META_EDIT = st.one_of(
    st.tuples(st.just("text"), st.sampled_from(fc.WEIRD_TEXTS)),
    st.tuples(st.just("field"), st.integers(0, 99), fc.json_values()),
    st.tuples(st.just("pattern"), st.sampled_from(PATTERN_TARGETS), fc.json_values()),
    st.tuples(st.just("tag"), st.sampled_from(("sks", "dog", "", "new")), fc.json_values()),
    st.tuples(st.just("json"), fc.json_values()),
    st.tuples(st.just("non-string"), fc.json_values()),
    st.tuples(st.just("component"), st.sampled_from(("text_encoder", "text_encoder_2", "unet", "te1", "", "bogus"))),
)


def _current_json(metadata: dict, key: str) -> dict:
    try:
        value = json.loads(metadata.get(key) or "null")
    except ValueError:
        value = None
    return value if isinstance(value, dict) else json.loads(json.dumps(META_TEMPLATES.get(key, {})))


def apply_metadata(metadata: dict, key: str, edit) -> dict:
    """Set ``metadata[key]`` per ``edit``; values stay JSON text (strings) except for the "non-string" edit."""
    metadata = dict(metadata)
    kind = edit[0]
    if kind == "text":
        metadata[key] = edit[1]
    elif kind == "json":
        metadata[key] = fc.emit(edit[1])
    elif kind == "non-string":
        metadata[key] = edit[1]
    elif kind == "component":
        metadata["lora_ops.component"] = edit[1]
    else:
        doc = _current_json(metadata, key)
        fields = META_FIELDS.get(key) or ("x",)
        if kind == "field":
            doc[fields[edit[1] % len(fields)]] = edit[2]
        elif kind == "pattern":
            prefix = "unet." if key == "lora_adapter_metadata" else ""
            pattern = doc.get(prefix + "alpha_pattern")
            pattern = dict(pattern) if isinstance(pattern, dict) else {}
            pattern[edit[1]] = edit[2]
            doc[prefix + "alpha_pattern"] = pattern
        elif kind == "tag":
            folder = doc.get("10_sks dog")
            folder = dict(folder) if isinstance(folder, dict) else {}
            folder[edit[1]] = edit[2]
            doc["10_sks dog"] = folder
        metadata[key] = fc.emit(doc)
    return metadata


@fuzz(450)
@given(data=st.data())
def test_fuzz_metadata_values(data, scratch):
    name = data.draw(st.sampled_from(SEEDS), label="seed")
    seed = fc.seeds()[name]
    entries, metadata = seed.parts()
    keys = tuple(k for k in META_KEYS if k in (metadata or {})) + META_KEYS
    key = data.draw(st.sampled_from(keys), label="key")
    edit = data.draw(META_EDIT, label="edit")
    metadata = apply_metadata(metadata or {}, key, edit)
    fc.check_path(_write(scratch, seed, fc.render(entries, metadata)), (name, key, edit))


CONFIG_EDIT = st.one_of(
    META_EDIT.filter(lambda e: e[0] in ("text", "field", "pattern", "json")),
    st.tuples(st.just("bytes"), st.sampled_from((b"\xff\xfe{}", b"\xef\xbb\xbf{}", b"{\"r\": 2\x00}", b"\x80",
                                                 b"{\"lora_alpha\": \"\xc3\"}", b""))),
)


@fuzz(150)
@given(edit=CONFIG_EDIT)
def test_fuzz_peft_folder_config(edit, scratch):
    """A PEFT folder's adapter_config.json: weird JSON text, wrong field types, bytes that are not UTF-8."""
    seed = fc.seeds()["peft_folder"]
    if edit[0] == "bytes":
        config = edit[1]
    else:
        meta = {"adapter_config": seed.config.decode()}
        config = str(apply_metadata(meta, "adapter_config", edit)["adapter_config"]).encode("utf-8", "surrogatepass")
    fc.check_path(scratch.write(seed.data, config), ("peft_folder", edit))


# -------------------------------------------------------------------------------------------- alias spellings

ALIAS_OP = st.tuples(st.integers(0, 999), st.integers(0, 9),
                     st.sampled_from(("add-all", "add-some", "move", "split")),
                     st.sampled_from(("same", "scaled")), st.integers(0, 15))


def apply_alias(entries: list, family: str, ops) -> list[str]:
    """Add (or move) a module's tensors under another spelling readers map to the same module; returns a log."""
    log = []
    for module_i, alt_i, mode, values, mask in ops:
        modules: dict[str, list] = {}
        for e in entries:
            modules.setdefault(fc.module_of(e.name), []).append(e)
        candidates = [(m, es) for m, es in modules.items() if any(fc.alias_spellings(e.name, family) for e in es)]
        if not candidates:
            continue
        module, group = candidates[module_i % len(candidates)]
        alts = [fc.alias_spellings(e.name, family) for e in group]
        width = max(len(a) for a in alts)
        j = alt_i % width
        chosen = [(e, a[j]) for e, a in zip(group, alts) if j < len(a)]
        if mode in ("add-some", "split") and len(chosen) > 1:
            chosen = [c for k, c in enumerate(chosen) if mask >> k & 1] or chosen[:1]
        for e, new_name in chosen:
            data = e.data
            if values == "scaled" and isinstance(e.info, dict) and e.info.get("dtype") in ("F32", "F16", "BF16"):
                t = safetensors.torch.load(fc.render([e], None))[e.name] * 2
                data = fc.tensor_bytes(t)
            if mode in ("move", "split"):
                e.name = new_name
            else:
                entries.append(fc.Entry(new_name, dict(e.info), data))
            log.append(f"{mode} {e.name if mode in ('move', 'split') else new_name}")
    return log


@fuzz(350)
@given(data=st.data())
def test_fuzz_alias_spellings(data, scratch):
    """A second spelling of an existing module (diffusers vs LDM UNet names, lora_te_ + lora_te1_, TE with and
    without text_model., lora_A + lora.down …) must be refused as a duplicate, never silently overwrite the first."""
    name = data.draw(st.sampled_from(SEEDS), label="seed")
    ops = data.draw(st.lists(ALIAS_OP, min_size=1, max_size=2), label="ops")
    seed = fc.seeds()[name]
    entries, metadata = seed.parts()
    log = apply_alias(entries, seed.family, ops)
    family = data.draw(FAMILIES, label="family")
    fc.check_path(_write(scratch, seed, fc.render(entries, metadata)), (name, ops, log), family=family)


# ------------------------------------------------------------------------------------------- mixed formats

MIX_OP = st.tuples(st.sampled_from(("union", "graft-module", "graft-key")), st.integers(0, 999))


@fuzz(150)
@given(data=st.data())
def test_fuzz_mixed_formats(data, scratch):
    """Keys of two formats in one file (a kohya file with a ComfyUI module grafted in, PEFT + diffusers …): the
    detected format's reader must refuse or list the foreign keys, never drop them."""
    name = data.draw(st.sampled_from(SEEDS), label="seed")
    other = data.draw(st.sampled_from(SEEDS), label="other seed")
    op, pick = data.draw(MIX_OP, label="op")
    family = data.draw(FAMILIES, label="family")
    seed = fc.seeds()[name]
    entries, metadata = seed.parts()
    extra, _ = fc.seeds()[other].parts()
    if op == "graft-module":
        modules = sorted({fc.module_of(e.name) for e in extra})
        chosen = modules[pick % len(modules)]
        extra = [e for e in extra if fc.module_of(e.name) == chosen]
    elif op == "graft-key":
        extra = [extra[pick % len(extra)]]
    names = {e.name for e in entries}
    entries += [e for e in extra if e.name not in names]
    fc.check_path(_write(scratch, seed, fc.render(entries, metadata)), (name, other, op, pick), family=family)


# ---------------------------------------------------------------------------------------------- tensor values

CAST_DTYPES = ("I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL", "C64", "F16", "BF16", "F64", "F32",
               "F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4")
ALPHA_VALUES = (float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e30, 131008.0, 3.5, 1e-45, 1e39, -3.5e38)
ALPHA_DTYPES = ("F32", "F16", "BF16", "F64", "I64", "BOOL", "C64", "F8_E4M3")
ROLE_SUFFIXES = (".lora_mid.weight", ".dora_scale", ".hada_t1", ".lokr_t2", ".alpha", ".lokr_w1", ".hada_w1_a",
                 ".lora_down.weight", ".lora_A.weight", ".weight", ".lora_up.weight", ".bias")
VALUE_OPS = st.one_of(
    st.tuples(st.just("nan"), st.integers(0, 999), st.integers(0, 10**6)),
    st.tuples(st.just("inf"), st.integers(0, 999), st.integers(0, 10**6), st.sampled_from((1, -1))),
    st.tuples(st.just("cast"), st.integers(0, 999), st.sampled_from(CAST_DTYPES)),
    st.tuples(st.just("reshape"), st.integers(0, 999), st.sampled_from(SHAPE_EDITS + ("rank0",))),
    st.tuples(st.just("alpha"), st.integers(0, 999), st.sampled_from(ALPHA_VALUES), st.sampled_from(ALPHA_DTYPES),
              st.sampled_from(([], [1], [2], [1, 1]))),
    st.tuples(st.just("drop"), st.integers(0, 999)),
    st.tuples(st.just("copy-as"), st.integers(0, 999), st.sampled_from(ROLE_SUFFIXES)),
    st.tuples(st.just("swap"), st.integers(0, 999), st.integers(0, 999)),
)


def _cast(t: torch.Tensor, name: str) -> tuple[torch.Tensor | None, bytes | None, list]:
    """``t`` in safetensors dtype ``name``: a tensor, or raw bytes + header shape where torch cannot cast."""
    dtype = fc.io.SAFETENSORS_DTYPES.get(name, (None,))[0]
    shape = list(t.shape)
    if name == "F4":  # two 4-bit values per byte; the header counts elements
        need = fc.needed_bytes("F4", shape)
        if need is None:
            shape = shape + [2]
            need = fc.needed_bytes("F4", shape)
        return None, bytes(i * 37 % 256 for i in range(need)), shape
    try:
        src = t.float() if not t.is_complex() else t
        return (src * 3).to(dtype) if dtype not in (torch.bool,) else (src > 0), None, shape
    except (RuntimeError, TypeError):
        need = fc.needed_bytes(name, shape)
        return None, bytes(i % 7 for i in range(need)), shape


def apply_values(tensors: dict, ops) -> list[fc.Entry]:
    """Tensor-level edits; returns entries (raw ones for dtypes torch cannot produce)."""
    raw: dict[str, fc.Entry] = {}
    for op in ops:
        keys = list(tensors) + list(raw)
        if not keys:
            break
        key = keys[op[1] % len(keys)]
        if key in raw and op[0] not in ("drop", "copy-as"):
            continue
        t = tensors.get(key)
        kind = op[0]
        if kind in ("nan", "inf"):
            if t.is_floating_point() and t.numel():
                t = t.clone()
                t.view(-1)[op[2] % t.numel()] = float("nan") if kind == "nan" else op[3] * float("inf")
                tensors[key] = t
        elif kind == "cast":
            new, data, shape = _cast(t, op[2])
            if new is not None:
                tensors[key] = new
            else:
                del tensors[key]
                raw[key] = fc.Entry(key, {"dtype": op[2], "shape": shape, "data_offsets": [0, len(data)]}, data)
        elif kind == "reshape":
            if op[2] == "rank0":
                tensors[key] = t[:0] if t.ndim else t.reshape(1)[:0]
            elif op[2] == "0-dim":
                tensors[key] = t.reshape(-1)[0].clone() if t.numel() else torch.tensor(0.0, dtype=t.dtype)
            else:
                shape = _shape_edit(list(t.shape), op[2])
                n = int(torch.tensor(shape, dtype=torch.int64).prod()) if shape else 1
                flat = t.reshape(-1)
                flat = flat.repeat(n // max(flat.numel(), 1) + 1)[:n] if flat.numel() else torch.zeros(n, dtype=t.dtype)
                tensors[key] = flat.reshape(shape).clone()
        elif kind == "alpha":
            module = fc.module_of(key)
            value, dtype_name, shape = op[2], op[3], op[4]
            dtype = fc.io.SAFETENSORS_DTYPES[dtype_name][0]
            base = torch.full(shape, value, dtype=torch.float64)
            try:
                alpha = base.to(dtype) if dtype != torch.bool else base != 0
            except RuntimeError:
                alpha = base.float()
            tensors[module + ".alpha"] = alpha
        elif kind == "drop":
            tensors.pop(key, None)
            raw.pop(key, None)
        elif kind == "copy-as":
            src = tensors[key] if key in tensors else None
            if src is not None:
                tensors[fc.module_of(key) + op[2]] = src.clone()
        elif kind == "swap":
            other = keys[op[2] % len(keys)]
            if other in tensors and other != key:
                tensors[key], tensors[other] = tensors[other], tensors[key]
    return [fc.entry_of(k, t) for k, t in tensors.items()] + list(raw.values())


@fuzz(500)
@given(data=st.data())
def test_fuzz_tensor_values(data, scratch):
    """NaN/Inf factors and alphas, int/bool/complex/fp8/fp4 factors, 0-dim and wrong-ndim parts, rank 0, extra
    roles: a valid file of odd tensors loads as a usable LoRA or is refused with the file named."""
    name = data.draw(st.sampled_from(SEEDS), label="seed")
    ops = data.draw(st.lists(VALUE_OPS, min_size=1, max_size=2), label="ops")
    seed = fc.seeds()[name]
    _entries, metadata = seed.parts()
    entries = apply_values(seed.tensors(), ops)
    family = data.draw(FAMILIES, label="family")
    fc.check_path(_write(scratch, seed, fc.render(entries, metadata)), (name, ops), family=family)


# ---------------------------------------------------------------------------------------------- special files


def _fifo(root):
    path = root / "pipe.safetensors"
    os.mkfifo(path)
    return path


def _folder_with_fifo_weights(root):
    folder = root / "adapter"
    folder.mkdir()
    os.mkfifo(folder / "adapter_model.safetensors")
    return folder


def _folder_with_fifo_config(root):
    folder = root / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(fc.seeds()["peft_folder"].data)
    os.mkfifo(folder / "adapter_config.json")
    return folder


def _folder_with_dir_config(root):
    folder = root / "adapter"
    (folder / "adapter_config.json").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(fc.seeds()["peft_folder"].data)
    return folder


def _folder_weights_dir(root):
    folder = root / "adapter"
    (folder / "adapter_model.safetensors").mkdir(parents=True)
    return folder


def _symlink_loop(root):
    a, b = root / "a.safetensors", root / "b.safetensors"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


def _config_symlink_loop(root):
    folder = root / "adapter"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(fc.seeds()["peft_folder"].data)
    (folder / "adapter_config.json").symlink_to(folder / "adapter_config.json")
    return folder


def _dangling(root):
    link = root / "gone.safetensors"
    link.symlink_to(root / "missing.safetensors")
    return link


def _link_to(target):
    def make(root):
        link = root / "dev.safetensors"
        link.symlink_to(target)
        return link
    return make


def _socket(root):
    path = root / "sock.safetensors"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    _SOCKETS.append(s)
    return path


def _empty_folder(root):
    (root / "empty").mkdir()
    return root / "empty"


def _long_name(root):
    return root / ("x" * 300 + ".safetensors")


def _many_tensors(root):
    """The seed plus 20_000 empty junk tensors: refused in well under the case timeout."""
    entries, meta = fc.seeds()["kohya_sd1"].parts()
    entries += [fc.Entry(f"junk.{i}", {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, b"")
                for i in range(20_000)]
    path = root / "many.safetensors"
    path.write_bytes(fc.render(entries, meta))
    return path


def _huge_adapter_metadata(root):
    """A 20 MB lora_adapter_metadata on a diffusers file (past the JSON size limit)."""
    entries, meta = fc.seeds()["diffusers_sd1"].parts()
    meta = {**meta, "lora_adapter_metadata": json.dumps({"unet.r": 2, "pad": "x" * 20_000_000})}
    path = root / "meta.safetensors"
    path.write_bytes(fc.render(entries, meta))
    return path


def _big_tag_frequency(root):
    """A 1 MB ss_tag_frequency of 60_000 tags: inspect's trigger words and combine's merge read all of it."""
    entries, meta = fc.seeds()["kohya_sd1"].parts()
    tags = ",".join(f'"t{i}":{i % 97}' for i in range(60_000))
    meta = {**meta, "ss_tag_frequency": '{"10_x":{' + tags + '},"5_y":{"a":1}}'}
    path = root / "tags.safetensors"
    path.write_bytes(fc.render(entries, meta))
    return path


def _text_file(content: bytes, name: str = "x.safetensors"):
    def make(root):
        path = root / name
        path.write_bytes(content)
        return path
    return make


def _pickle(root):
    path = root / "lora.safetensors"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 4)}, path)
    return path


_SOCKETS: list[socket.socket] = []
SPECIAL = {
    "fifo": _fifo,
    "fifo-as-folder-weights": _folder_with_fifo_weights,
    "fifo-as-adapter_config": _folder_with_fifo_config,
    "adapter_config-is-a-folder": _folder_with_dir_config,
    "weights-name-is-a-folder": _folder_weights_dir,
    "empty-folder": _empty_folder,
    "symlink-loop": _symlink_loop,
    "adapter_config-symlink-loop": _config_symlink_loop,
    "dangling-symlink": _dangling,
    "dev-null": lambda root: __import__("pathlib").Path("/dev/null"),
    "link-to-dev-zero": _link_to("/dev/zero"),
    "link-to-dev-null": _link_to("/dev/null"),
    "unix-socket": _socket,
    "name-too-long": _long_name,
    "nul-in-name": lambda root: root / "a\0b.safetensors",
    "20k-junk-tensors": _many_tensors,
    "20MB-adapter-metadata": _huge_adapter_metadata,
    "1MB-tag-frequency": _big_tag_frequency,
    "torch-zip-pickle": _pickle,
    "lfs-pointer": _text_file(b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n"),
    "html-page": _text_file(b"<!DOCTYPE html><html><body>Sign in</body></html>"),
    "json-error-reply": _text_file(b'{"error": "not found"}'),
    "header-only": _text_file(struct.pack("<Q", 2) + b"{}"),
    "empty-file": _text_file(b""),
}


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_special_files(kind, tmp_path):
    """No special file hangs the loader or escapes as a foreign exception (hard timeout: a FIFO must not block)."""
    path = SPECIAL[kind](tmp_path)
    try:
        outcome = fc.check_path(path, kind, timeout=3 if "fifo" in kind else fc.CASE_TIMEOUT_S)
    finally:
        while _SOCKETS:
            _SOCKETS.pop().close()
    if kind not in ("fifo-as-adapter_config", "adapter_config-is-a-folder", "adapter_config-symlink-loop",
                    "1MB-tag-frequency"):
        assert outcome.kind in ("refused", "violation" if fc.COLLECT else "refused"), f"{kind}: {outcome}"


# ------------------------------------------------------------------------------------------ the harness itself


def test_harness_notices_a_dropped_tensor(scratch, monkeypatch):
    """The accounting check is what catches a reader that silently overwrites or skips a key: prove it fires."""
    monkeypatch.setattr(fc, "COLLECT", None)
    monkeypatch.setattr(fc, "STATS", fc.Counter())  # the provoked violation is not one of the run's
    seed = fc.seeds()["kohya_sd1"]
    path = _write(scratch, seed, seed.data)
    lora = fc.load_lora(path)
    dropped = lora.replace(layers={k: ly for i, (k, ly) in enumerate(lora.layers.items()) if i})
    with pytest.raises(fc.Violation, match="dropped-key"):
        fc._check_accounting(dropped, path, "harness self-test")
    fc._check_accounting(lora, path, "harness self-test")


def test_harness_times_out_a_blocking_open(tmp_path, monkeypatch):
    monkeypatch.setattr(fc, "COLLECT", None)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    start = time.perf_counter()
    with pytest.raises(fc.Hang):
        with fc.hard_timeout(0.5):
            fifo.read_bytes()
    assert time.perf_counter() - start < 5
