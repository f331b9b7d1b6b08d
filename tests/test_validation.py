"""Bad input (issue 12): every reader goes through one validation layer.

No malformed file may end in a traceback from inside torch or `json`, no key may be silently dropped or
overwritten, and no non-finite alpha may be accepted. Each refusal is a `LoraFormatError` (or `LoraFileError` for an
unreadable file) whose message names the file and the key(s). Informational metadata (tag frequencies, network
args) never makes inspect / resize / combine fail: inspect reports it, resize and combine leave it out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_ops import LoraFormatError
from lora_ops import lora as L
from lora_ops.combine import combine
from lora_ops.errors import LoraFileError
from lora_ops.files import load_lora
from lora_ops.formats import read_lora
from lora_ops.inspect import format_report, inspect_lora
from lora_ops.lora import LoRA, LoRALayer, LycorisLayer
from lora_ops.resize import updated_metadata

FILE = "bad.safetensors"
DIFF_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # diffusers spelling, SD 1.x
LDM_Q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # the same module, LDM spelling
KOHYA_Q = "lora_unet_" + DIFF_Q.replace(".", "_")
KOHYA_Q_LDM = "lora_unet_" + LDM_Q.replace(".", "_")
TE_Q = "encoder_layers_0_self_attn_q_proj"


def rnd(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=dtype)


def lora_pair(prefix: str, down: str = ".lora_down.weight", up: str = ".lora_up.weight", r: int = 2,
              d: int = 8) -> dict[str, torch.Tensor]:
    return {prefix + down: rnd(r, d), prefix + up: rnd(d, r)}


def refused(exc: type[Exception], fn, *names: str) -> Exception:
    """``fn()`` raises exactly ``exc`` whose message names every one of ``names``."""
    with pytest.raises(exc) as info:
        fn()
    assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
    for name in names:
        assert str(name) in str(info.value), f"{name!r} not named in: {info.value}"
    return info.value


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


# --------------------------------------------------------------------------------- metadata / config JSON

DEEP = "[" * 10_000 + "]" * 10_000
# (id, PEFT LoraConfig as JSON text, word the refusal must say). Texts are written for PEFT's own field names;
# the diffusers variant prefixes every field with "unet." the way `lora_adapter_metadata` packs components.
BAD_CONFIGS = [
    ("huge-int", '{"r": 2, "lora_alpha": 1' + "0" * 5000 + "}", "digits"),
    ("deep-nesting", '{"r": 2, "target_modules": ' + DEEP + "}", "nested"),
    ("nan", '{"r": 2, "lora_alpha": NaN}', "NaN"),
    ("infinity", '{"r": 2, "lora_alpha": Infinity}', "Infinity"),
    ("minus-infinity", '{"r": 2, "lora_alpha": -Infinity}', "Infinity"),
    ("overflow", '{"r": 2, "lora_alpha": 1e999}', "infinity"),
    ("duplicate-key", '{"r": 2, "lora_alpha": 2, "lora_alpha": 8}', "twice"),
    ("not-json", '{"r": 2, "lora_alpha": ', "not valid JSON"),
    ("not-an-object", "[2, 4]", "object"),
    ("alpha-pattern-list", '{"r": 2, "lora_alpha": 2, "alpha_pattern": [1, 2]}', "alpha_pattern"),
    ("alpha-pattern-value", '{"r": 2, "lora_alpha": 2, "alpha_pattern": {"to_q": "x"}}', "alpha_pattern"),
    ("alpha-pattern-nan", '{"r": 2, "lora_alpha": 2, "alpha_pattern": {"to_q": NaN}}', "NaN"),
    ("lora-alpha-string", '{"r": 2, "lora_alpha": "8"}', "lora_alpha"),
    ("lora-alpha-list", '{"r": 2, "lora_alpha": [8]}', "lora_alpha"),
    ("lora-alpha-bool", '{"r": 2, "lora_alpha": true}', "lora_alpha"),
    ("r-float", '{"r": 2.0, "lora_alpha": 2}', "r' must be a positive integer"),
    ("r-bool", '{"r": true, "lora_alpha": 2}', "r' must be a positive integer"),
    ("r-negative", '{"r": -2, "lora_alpha": 2}', "r' must be a positive integer"),
    ("rank-pattern-float", '{"r": 2, "lora_alpha": 2, "rank_pattern": {"to_q": 1.5}}', "rank_pattern"),
]
BAD_IDS = [c[0] for c in BAD_CONFIGS]


def _as_diffusers(text: str) -> str:
    """A PEFT config text as diffusers' ``lora_adapter_metadata`` (fields prefixed with the component)."""
    for name in ("r", "lora_alpha", "alpha_pattern", "rank_pattern", "target_modules"):
        text = text.replace(f'"{name}"', f'"unet.{name}"')
    return text


def diffusers_file(config_text: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = lora_pair(f"unet.{DIFF_Q}", ".lora_A.weight", ".lora_B.weight")
    return tensors, {"lora_adapter_metadata": _as_diffusers(config_text)}


def peft_file(config_text: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = lora_pair(f"base_model.model.{DIFF_Q}", ".lora_A.weight", ".lora_B.weight")
    return tensors, ({} if config_text is None else {"adapter_config": config_text})


def test_good_configs_still_read():
    """The refusals below are not over-eager: PEFT's and diffusers' own configs load with their alphas."""
    good = '{"r": 2, "lora_alpha": 4, "alpha_pattern": {"attn1.to_q": 1}, "rank_pattern": {}, "use_dora": false}'
    lora, _ = read_lora(*peft_file(good), family="sd1")
    assert lora[f"unet.{LDM_Q}"].alpha == 1.0
    lora, _ = read_lora(*diffusers_file(good), family="sd1")
    assert lora[f"unet.{LDM_Q}"].alpha == 1.0
    lora, _ = read_lora(*peft_file('{"r": 2, "lora_alpha": null}'), family="sd1")
    assert lora[f"unet.{LDM_Q}"].alpha is None


@pytest.mark.parametrize("text,word", [c[1:] for c in BAD_CONFIGS], ids=BAD_IDS)
def test_bad_lora_adapter_metadata_is_refused_naming_file_and_key(text, word):
    err = refused(LoraFormatError, lambda: read_lora(*diffusers_file(text), family="sd1", file=FILE),
                  FILE, "lora_adapter_metadata", word)
    assert err.key == "lora_adapter_metadata"


@pytest.mark.parametrize("text,word", [c[1:] for c in BAD_CONFIGS], ids=BAD_IDS)
def test_bad_adapter_config_metadata_is_refused_naming_file_and_key(text, word):
    err = refused(LoraFormatError, lambda: read_lora(*peft_file(text), family="sd1", file=FILE),
                  FILE, "adapter_config", word)
    assert err.key == "adapter_config"


@pytest.mark.parametrize("fmt", ["diffusers", "peft"])
@pytest.mark.parametrize("text,word", [c[1:] for c in BAD_CONFIGS], ids=BAD_IDS)
def test_bad_config_metadata_in_a_file_on_disk(tmp_path, fmt, text, word):
    tensors, meta = diffusers_file(text) if fmt == "diffusers" else peft_file(text)
    path = save(tmp_path / f"{fmt}.safetensors", tensors, meta)
    err = refused(LoraFormatError, lambda: load_lora(path, family="sd1"), str(path), next(iter(meta)), word)
    assert err.key == next(iter(meta))


@pytest.mark.parametrize("text,word", [c[1:] for c in BAD_CONFIGS], ids=BAD_IDS)
def test_bad_adapter_config_json_beside_a_peft_folder(tmp_path, text, word):
    folder = tmp_path / "adapter"
    folder.mkdir()
    save(folder / "adapter_model.safetensors", peft_file(None)[0])
    (folder / "adapter_config.json").write_text(text)
    refused(LoraFormatError, lambda: load_lora(folder, family="sd1"), str(folder / "adapter_config.json"), word)


def test_oversized_adapter_config_json_is_refused_before_it_is_read(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    save(folder / "adapter_model.safetensors", peft_file(None)[0])
    (folder / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 8, "notes": "' + "x" * (1 << 24) + '"}')
    refused(LoraFileError, lambda: load_lora(folder, family="sd1"), str(folder / "adapter_config.json"), "bytes")


def test_good_adapter_config_json_beside_a_peft_folder(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    save(folder / "adapter_model.safetensors", peft_file(None)[0])
    (folder / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 8, "peft_type": "LORA"}')
    assert load_lora(folder, family="sd1")[f"unet.{LDM_Q}"].alpha == 8.0


# --------------------------------------------------------------------------------------- non-finite alphas

@pytest.mark.parametrize("alpha", [math.nan, math.inf, -math.inf])
def test_non_finite_alpha_is_refused_by_the_layer_itself(alpha):
    refused(LoraFormatError, lambda: LoRALayer(down=rnd(2, 8), up=rnd(8, 2), alpha=alpha), "alpha", "finite")
    parts = {"lokr_w1": rnd(2, 2), "lokr_w2": rnd(4, 4)}
    refused(LoraFormatError, lambda: LycorisLayer("lokr", parts, alpha=alpha), "alpha", "finite")


def test_alpha_of_a_non_numeric_type_is_refused():
    refused(LoraFormatError, lambda: LoRALayer(down=rnd(2, 8), up=rnd(8, 2), alpha=True), "alpha", "number")
    refused(LoraFormatError, lambda: LoRALayer(down=rnd(2, 8), up=rnd(8, 2), alpha="4"), "alpha", "number")


@pytest.mark.parametrize("alpha,word", [
    (torch.tensor(True), "bool"),
    (torch.tensor(1 + 2j, dtype=torch.complex64), "complex64"),
    (torch.zeros(1, dtype=torch.uint8).view(torch.float4_e2m1fn_x2), "float4_e2m1fn_x2"),
    (torch.zeros(1, dtype=torch.uint8).view(torch.float8_e8m0fnu), "float8_e8m0fnu"),
], ids=["bool", "complex", "f4", "e8m0"])
def test_alpha_tensor_must_be_a_finite_real_number(alpha, word):
    tensors = {**lora_pair(KOHYA_Q), f"{KOHYA_Q}.alpha": alpha}
    refused(LoraFormatError, lambda: read_lora(tensors, family="sd1", file=FILE), FILE, f"{KOHYA_Q}.alpha", word)


def test_integer_and_fp8_alphas_still_read():
    for alpha in (torch.tensor(4, dtype=torch.int64), torch.tensor(4.0).to(torch.float8_e4m3fn)):
        lora, _ = read_lora({**lora_pair(KOHYA_Q), f"{KOHYA_Q}.alpha": alpha}, family="sd1")
        assert lora[f"unet.{LDM_Q}"].alpha == 4.0


# ------------------------------------------------------------------------------------- factor dtypes / shapes

BAD_DTYPES = {
    "int32": lambda t: t.to(torch.int32),
    "int64": lambda t: t.to(torch.int64),
    "uint8": lambda t: t.to(torch.uint8),
    "bool": lambda t: t > 0,
    "complex64": lambda t: t.to(torch.complex64),
    "float4_e2m1fn_x2": lambda t: torch.zeros(t.shape, dtype=torch.uint8).view(torch.float4_e2m1fn_x2),
    "float8_e8m0fnu": lambda t: torch.zeros(t.shape, dtype=torch.uint8).view(torch.float8_e8m0fnu),
}
LOHA = {"hada_w1_a": (8, 2), "hada_w1_b": (2, 8), "hada_w2_a": (8, 2), "hada_w2_b": (2, 8)}


def loha_file(**shapes: tuple[int, ...] | torch.Tensor) -> dict[str, torch.Tensor]:
    parts = {**LOHA, **shapes}
    return {f"{KOHYA_Q}.{n}": (s if isinstance(s, torch.Tensor) else rnd(*s)) for n, s in parts.items()}


@pytest.mark.parametrize("dtype", list(BAD_DTYPES))
def test_lora_factor_dtype_that_torch_cannot_compute_in_is_refused(dtype):
    tensors = lora_pair(KOHYA_Q)
    tensors[f"{KOHYA_Q}.lora_up.weight"] = BAD_DTYPES[dtype](tensors[f"{KOHYA_Q}.lora_up.weight"])
    refused(LoraFormatError, lambda: read_lora(tensors, family="sd1", file=FILE), FILE,
            f"{KOHYA_Q}.lora_up.weight", dtype)


@pytest.mark.parametrize("dtype", list(BAD_DTYPES))
def test_loha_factor_dtype_that_torch_cannot_compute_in_is_refused(dtype):
    tensors = loha_file(hada_w2_b=BAD_DTYPES[dtype](rnd(2, 8)))
    refused(LoraFormatError, lambda: read_lora(tensors, family="sd1", file=FILE), FILE,
            f"{KOHYA_Q}.hada_w2_b", dtype)


def test_e8m0_factor_in_a_file_on_disk_is_refused(tmp_path):
    tensors = lora_pair(KOHYA_Q)
    tensors[f"{KOHYA_Q}.lora_down.weight"] = BAD_DTYPES["float8_e8m0fnu"](tensors[f"{KOHYA_Q}.lora_down.weight"])
    path = save(tmp_path / "e8m0.safetensors", tensors)
    refused(LoraFormatError, lambda: load_lora(path, family="sd1"), str(path), f"{KOHYA_Q}.lora_down.weight",
            "float8_e8m0fnu")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16, torch.float64])
def test_floating_factor_dtypes_still_read_and_delta_works(dtype):
    tensors = {k: v.to(dtype) for k, v in {**loha_file(), **lora_pair(KOHYA_Q.replace("to_q", "to_k"))}.items()}
    lora, _ = read_lora(tensors, family="sd1")
    assert {layer.kind for layer in lora.layers.values()} == {"loha", "lora"}
    for layer in lora.layers.values():
        assert L.delta(layer).shape == (8, 8)


@pytest.mark.parametrize("parts,key", [
    ({"hada_w1_a": torch.tensor(1.0)}, "hada_w1_a"),  # 0-dim
    ({"hada_w2_b": torch.tensor(0.5)}, "hada_w2_b"),  # 0-dim
    ({"hada_w1_b": (3, 8)}, "hada_w1_b"),  # w1a (8, 2) · w1b (3, 8) do not multiply
    ({"hada_w2_a": (8, 2, 1)}, "hada_w2_a"),  # 3-D
    ({"hada_w2_a": (4, 2)}, "hada_w2_a"),  # w1 is 8×8, w2 4×8: the Hadamard product would fail
    ({"hada_w2_a": (1, 2)}, "hada_w2_a"),  # w2 1×8 would silently broadcast against w1 8×8
    ({"hada_t1": (2, 2, 3, 3), "hada_w1_a": (2, 8), "hada_w1_b": (2, 8)}, "hada_w2_a"),  # Tucker w1 4-D vs w2 2-D
    ({"hada_t1": (3, 2, 3, 3), "hada_w1_a": (2, 8), "hada_w1_b": (2, 8), "hada_t2": (2, 2, 3, 3),
      "hada_w2_a": (2, 8), "hada_w2_b": (2, 8)}, "hada_t1"),  # Tucker core does not fit its factors
], ids=["w1a-0d", "w2b-0d", "w1-no-matmul", "w2a-3d", "w1-w2-differ", "w2-broadcasts", "tucker-vs-flat",
        "tucker-core"])
def test_loha_factors_that_do_not_combine_are_refused(parts, key):
    tensors = loha_file(**parts)
    refused(LoraFormatError, lambda: read_lora(tensors, family="sd1", file=FILE), FILE, f"{KOHYA_Q}.{key}")


@pytest.mark.parametrize("parts,key", [
    ({"lokr_w1": torch.tensor(2.0), "lokr_w2": (4, 4)}, "lokr_w1"),  # 0-dim
    ({"lokr_w1": (2, 2), "lokr_w2": torch.tensor(2.0)}, "lokr_w2"),  # 0-dim
    ({"lokr_w1": (2, 2, 2), "lokr_w2": (4, 4)}, "lokr_w1"),  # 3-D
    ({"lokr_w1_a": (2, 3), "lokr_w1_b": (2, 2), "lokr_w2": (4, 4)}, "lokr_w1_b"),  # do not multiply
    ({"lokr_w1": (2, 2), "lokr_w2_a": (4, 2), "lokr_w2_b": (3, 4)}, "lokr_w2_b"),  # do not multiply
    ({"lokr_w1": (2, 2), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (3, 4), "lokr_w2_b": (2, 4)}, "lokr_t2"),
    ({"lokr_w1": (2, 2), "lokr_w1_a": (2, 1), "lokr_w1_b": (1, 2), "lokr_w2": (4, 4)}, "lokr_w1"),  # both
    ({"lokr_w1": (2, 2), "lokr_w2": (4, 4), "lokr_t2": (2, 2, 3, 3)}, "lokr_t2"),  # t2 would be unused
], ids=["w1-0d", "w2-0d", "w1-3d", "w1-no-matmul", "w2-no-matmul", "tucker-core", "w1-twice", "t2-unused"])
def test_lokr_factors_that_do_not_combine_are_refused(parts, key):
    tensors = {f"{KOHYA_Q}.{n}": (s if isinstance(s, torch.Tensor) else rnd(*s)) for n, s in parts.items()}
    refused(LoraFormatError, lambda: read_lora(tensors, family="sd1", file=FILE), FILE, f"{KOHYA_Q}.{key}")


def test_tucker_lokr_delta_does_not_fail_in_torch():
    """torch.kron views its inputs; the Tucker w2 is a permuted einsum result, so it must be made contiguous."""
    parts = {"lokr_w1": rnd(2, 2), "lokr_t2": rnd(2, 2, 3, 3), "lokr_w2_a": rnd(2, 4), "lokr_w2_b": rnd(2, 4)}
    lora, _ = read_lora({f"{KOHYA_Q}.{n}": t for n, t in parts.items()}, family="sd1")
    w2 = torch.einsum("ijkl,jr,ip->prkl", parts["lokr_t2"], parts["lokr_w2_b"], parts["lokr_w2_a"])
    ref = torch.kron(parts["lokr_w1"][:, :, None, None].contiguous(), w2.contiguous())
    torch.testing.assert_close(L.delta(lora[f"unet.{LDM_Q}"]), ref)


@pytest.mark.parametrize("roles,key", [
    ({"lora_down.weight": (2, 8), "lora_up.weight": (8, 2, 3, 3)}, "lora_up.weight"),  # up must be out×r×1×1
    ({"lora_down.weight": torch.tensor(1.0), "lora_up.weight": (8, 2)}, "lora_down.weight"),  # 0-dim
    ({"lora_down.weight": (2, 8), "lora_up.weight": (8, 2), "lora_mid.weight": (2, 2, 3, 3)},
     "lora_down.weight"),  # Tucker mid needs down r×in×1×1
    ({"lora_down.weight": (2, 8, 1, 1), "lora_up.weight": (8, 2, 1, 1), "lora_mid.weight": (2, 2)},
     "lora_mid.weight"),  # mid must be 4-D
    ({"lora_down.weight": (2, 8), "lora_up.weight": (8, 2), "dora_scale": (5, 1)}, "dora_scale"),  # no such size
    ({"lora_down.weight": (2, 8), "lora_up.weight": (8, 2), "dora_scale": torch.tensor(1.0)}, "dora_scale"),
], ids=["up-kernel", "down-0d", "mid-flat-down", "mid-2d", "dora-size", "dora-0d"])
def test_lora_factors_that_do_not_combine_are_refused(roles, key):
    tensors = {f"{KOHYA_Q}.{n}": (s if isinstance(s, torch.Tensor) else rnd(*s)) for n, s in roles.items()}
    refused(LoraFormatError, lambda: read_lora(tensors, family="sd1", file=FILE), FILE, f"{KOHYA_Q}.{key}")


def test_valid_dora_and_tucker_layers_still_read():
    tensors = {**lora_pair(KOHYA_Q), f"{KOHYA_Q}.dora_scale": rnd(8, 1)}
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    tensors.update({f"{conv}.lora_down.weight": rnd(2, 8, 1, 1), f"{conv}.lora_up.weight": rnd(8, 2, 1, 1),
                    f"{conv}.lora_mid.weight": rnd(2, 2, 3, 3)})
    lora, _ = read_lora(tensors, family="sd1")
    assert {tuple(L.delta(layer).shape) for layer in lora.layers.values()} == {(8, 8), (8, 8, 3, 3)}


# ----------------------------------------------------------------------------------- silently dropped keys

DUPLICATES = [
    # kohya: one UNet module in diffusers spelling and in LDM spelling
    ("kohya-unet-spellings", {**lora_pair(KOHYA_Q), **lora_pair(KOHYA_Q_LDM)},
     [f"{KOHYA_Q}.lora_down.weight", f"{KOHYA_Q_LDM}.lora_down.weight"]),
    # kohya: a text-encoder module with and without `text_model.`
    ("kohya-te-text_model", {**lora_pair(f"lora_te_{TE_Q}"), **lora_pair(f"lora_te_text_model_{TE_Q}")},
     [f"lora_te_{TE_Q}.lora_down.weight", f"lora_te_text_model_{TE_Q}.lora_down.weight"]),
    # kohya: lora_te_ and lora_te1_ are both the first text encoder
    ("kohya-te-te1", {**lora_pair(f"lora_te_text_model_{TE_Q}"), **lora_pair(f"lora_te1_text_model_{TE_Q}")},
     [f"lora_te_text_model_{TE_Q}.lora_down.weight", f"lora_te1_text_model_{TE_Q}.lora_down.weight"]),
    # kohya: text_projection lives beside text_model; spelled inside it, it is still the same module
    ("kohya-te-text_projection", {**lora_pair("lora_te_text_projection"),
                                  **lora_pair("lora_te_text_model_text_projection")},
     ["lora_te_text_projection.lora_down.weight", "lora_te_text_model_text_projection.lora_down.weight"]),
    # diffusers: one module with lora_A and the older lora.down spelling
    ("diffusers-two-suffixes", {**lora_pair(f"unet.{DIFF_Q}", ".lora_A.weight", ".lora_B.weight"),
                                f"unet.{DIFF_Q}.lora.down.weight": rnd(2, 8)},
     [f"unet.{DIFF_Q}.lora_A.weight", f"unet.{DIFF_Q}.lora.down.weight"]),
    # diffusers: a text-encoder path with and without `text_model.`
    ("diffusers-te-text_model",
     {**lora_pair("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", ".lora_A.weight", ".lora_B.weight"),
      **lora_pair("text_encoder.encoder.layers.0.self_attn.q_proj", ".lora_A.weight", ".lora_B.weight")},
     ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
      "text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight"]),
    # PEFT: lora_A and lora.down for one module
    ("peft-two-suffixes", {**lora_pair(f"base_model.model.{DIFF_Q}", ".lora_A.weight", ".lora_B.weight"),
                           f"base_model.model.{DIFF_Q}.lora.up.weight": rnd(8, 2)},
     [f"base_model.model.{DIFF_Q}.lora_B.weight", f"base_model.model.{DIFF_Q}.lora.up.weight"]),
    # ComfyUI: kohya and PEFT suffixes for one module
    ("comfyui-two-suffixes", {**lora_pair(f"diffusion_model.{LDM_Q}"),
                              f"diffusion_model.{LDM_Q}.lora_A.weight": rnd(2, 8)},
     [f"diffusion_model.{LDM_Q}.lora_down.weight", f"diffusion_model.{LDM_Q}.lora_A.weight"]),
    # ComfyUI: one UNet module in LDM and diffusers spelling
    ("comfyui-unet-spellings", {**lora_pair(f"diffusion_model.{LDM_Q}"), **lora_pair(f"diffusion_model.{DIFF_Q}")},
     [f"diffusion_model.{LDM_Q}.lora_down.weight", f"diffusion_model.{DIFF_Q}.lora_down.weight"]),
]


@pytest.mark.parametrize("tensors,keys", [d[1:] for d in DUPLICATES], ids=[d[0] for d in DUPLICATES])
def test_two_spellings_of_one_module_are_refused_naming_both_keys(tensors, keys):
    refused(LoraFormatError, lambda: read_lora(tensors, family="sd1", file=FILE), FILE, *keys)


def test_two_spellings_in_a_file_on_disk_are_refused(tmp_path):
    path = save(tmp_path / "dup.safetensors", {**lora_pair(KOHYA_Q), **lora_pair(KOHYA_Q_LDM)})
    refused(LoraFormatError, lambda: load_lora(path), str(path), KOHYA_Q, KOHYA_Q_LDM)


def test_distinct_modules_still_read():
    tensors = {**lora_pair(KOHYA_Q), **lora_pair(KOHYA_Q.replace("to_q", "to_k")),
               **lora_pair(f"lora_te_text_model_{TE_Q}")}
    lora, unused = read_lora(tensors, family="sd1")
    assert unused == [] and len(lora.layers) == 3


# ------------------------------------------------------------------ informational metadata: inspect, resize, combine

BAD_INFO_JSON = {
    "huge-int": '{"1_sks": {"sks": 1' + "0" * 5000 + "}}",
    "deep-nesting": '{"1_sks": ' + DEEP + "}",
    "nan": '{"1_sks": {"sks": NaN}}',
    "infinity": '{"1_sks": {"sks": Infinity}}',
    "overflow": '{"1_sks": {"sks": 1e999}}',
    "not-json": '{"1_sks": ',
}


def tiny_lora(metadata: dict[str, str]) -> LoRA:
    layers = {f"unet.{LDM_Q}": LoRALayer(down=rnd(2, 8), up=rnd(8, 2), alpha=2.0),
              "unet.input_blocks.1.0.in_layers.2": LoRALayer(down=rnd(2, 4, 3, 3), up=rnd(8, 2, 1, 1), alpha=2.0)}
    return LoRA(layers, metadata, family="sd1")


@pytest.mark.parametrize("text", list(BAD_INFO_JSON.values()), ids=list(BAD_INFO_JSON))
def test_inspect_reports_bad_tag_frequency_instead_of_failing(text):
    lora = tiny_lora({"ss_tag_frequency": text, "modelspec.trigger_phrase": "sks style"})
    report = inspect_lora(lora, FILE)
    json.dumps(report)
    assert report["trigger_words"] == ["sks style"]
    assert len(report["metadata_problems"]) == 1 and "ss_tag_frequency" in report["metadata_problems"][0]
    assert "metadata problem" in format_report(report) and "ss_tag_frequency" in format_report(report)


def test_inspect_reports_tag_counts_of_the_wrong_type():
    report = inspect_lora(tiny_lora({"ss_tag_frequency": '{"1_a": {"x": "3", "y": 2}, "2_b": [1]}'}))
    assert report["trigger_words"] == ["y"]
    assert report["metadata_problems"] and "2 entries ignored" in report["metadata_problems"][0]
    assert inspect_lora(tiny_lora({"ss_tag_frequency": '{"1_a": {"x": 3}}'}))["metadata_problems"] == []


PARSED_BEFORE = {k: v for k, v in BAD_INFO_JSON.items() if k != "not-json"}  # what json.loads let through


@pytest.mark.parametrize("text", list(PARSED_BEFORE.values()), ids=list(PARSED_BEFORE))
def test_resize_leaves_bad_network_args_as_they_were(text):
    lora = tiny_lora({"ss_network_args": text.replace('"1_sks"', '"conv_dim"')})
    meta = updated_metadata(lora.metadata, lora, "resized")
    assert meta["ss_network_args"] == lora.metadata["ss_network_args"]
    good = tiny_lora({"ss_network_args": '{"conv_dim": "8", "conv_alpha": "1"}'})
    assert json.loads(updated_metadata(good.metadata, good, "resized")["ss_network_args"]) == {
        "conv_dim": "2", "conv_alpha": "2"}


@pytest.mark.parametrize("text", list(PARSED_BEFORE.values()), ids=list(PARSED_BEFORE))
def test_combine_leaves_bad_tag_frequency_and_dataset_dirs_out(text):
    bad = tiny_lora({"ss_tag_frequency": text, "ss_dataset_dirs": text})
    good = tiny_lora({"ss_tag_frequency": '{"1_sks": {"sks": 3}}'})
    out, _ = combine([(bad, 1.0, None), (good, 1.0, None)], "concat")
    assert json.loads(out.metadata["ss_tag_frequency"]) == {"1_sks": {"sks": 3}}


# ------------------------------------------------------------------------------------------- safe_json itself

def test_safe_json_limits_and_getters():
    from lora_ops import safe_json

    assert safe_json.loads('{"a": [1, 2.5, "x]{"], "b": {"c": null}}') == {"a": [1, 2.5, "x]{"], "b": {"c": None}}
    assert safe_json.nesting_depth('["[[[[", {"a": "\\"[["}]') == 2  # brackets inside strings do not count
    assert safe_json.loads("[" * 32 + "]" * 32, expect=list)
    with pytest.raises(LoraFormatError, match="nested"):
        safe_json.loads("[" * 33 + "]" * 33, expect=list)
    assert safe_json.loads("[" + "1" * 100 + "]", expect=list) == [int("1" * 100)]
    with pytest.raises(LoraFormatError, match="101 digits"):
        safe_json.loads("[-" + "1" * 101 + "]", expect=list)
    with pytest.raises(LoraFormatError, match="characters"):
        safe_json.loads('"' + "x" * 20 + '"', expect=str, max_chars=10)
    with pytest.raises(LoraFormatError, match="not valid JSON"):
        safe_json.loads('"' + '\\"' * 50_000, file="f", key="k")  # an unterminated string: linear, not quadratic
    assert safe_json.finite_number(3, field="x") == 3.0
    for bad in (True, "3", None, [3], 10**400):
        with pytest.raises(LoraFormatError, match="'x'"):
            safe_json.finite_number(bad, field="x", file="f", key="k")
    assert safe_json.positive_int(4, field="r") == 4
    for bad in (0, -1, 4.0, False, "4"):
        with pytest.raises(LoraFormatError, match="'r' must be a positive integer"):
            safe_json.positive_int(bad, field="r")
    assert safe_json.number_map({"a": 1, "b": 2.5}, field="p") == {"a": 1.0, "b": 2.5}
    assert safe_json.number_map(None, field="p") == {}
    with pytest.raises(LoraFormatError, match="must be an object"):
        safe_json.number_map([1], field="p")


def test_alpha_beyond_fp32_range_round_trips(tmp_path):
    """A finite alpha fp32 cannot hold is written as fp64, not as Inf that our own reader would then refuse."""
    import torch as _torch

    from lora_ops.files import load_lora, save_lora
    from lora_ops.lora import LoRA, LoRALayer

    key = "unet.input_blocks.1.1.proj_in"
    lora = LoRA({key: LoRALayer(_torch.randn(2, 32), _torch.randn(32, 2), alpha=1e39)}, family="sd1")
    for fmt in ("kohya", "comfyui", "diffusers"):
        back = load_lora(save_lora(lora, tmp_path / f"{fmt}.safetensors", fmt))
        assert back.layers[key].alpha == 1e39, fmt
