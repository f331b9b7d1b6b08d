"""Files we write load in the third-party code itself (diffusers, PEFT) with every key used and the same ΔW."""


import pytest
from helpers import sample_lora

from lora_ops import keymap
from lora_ops import lora as L
from lora_ops.files import save_lora
from lora_ops.testing import tiny


def _pipeline_modules(pipe, family):
    """canonical key → (module path, model) for the pipeline's UNet and text encoders."""
    out = {}
    out.update({k: (p, pipe.unet) for k, p in keymap.unet_canonical_keys(pipe.unet, family).items()})
    out.update({k: (p, pipe.text_encoder) for k, p in keymap.te_canonical_keys(pipe.text_encoder, "te1").items()})
    if getattr(pipe, "text_encoder_2", None) is not None:
        out.update({k: (p, pipe.text_encoder_2)
                    for k, p in keymap.te_canonical_keys(pipe.text_encoder_2, "te2").items()})
    return out


def _fused_deltas(pipe, family, path, lora):
    """Load ``path`` with diffusers, fuse it, and return ΔW per canonical key as diffusers computed it."""
    modules = _pipeline_modules(pipe, family)

    def weight(key):
        p, model = modules[key]
        return dict(model.named_modules())[p].weight.detach().clone()

    before = {k: weight(k) for k in lora.layers}
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    return {k: weight(k) - before[k] for k in lora.layers}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_file_loads_in_diffusers_exactly(tmp_path, warnings_log, family):
    lora = sample_lora(family, rank=4, alpha=3.0, attention_only=True)
    # different ranks and alphas per layer must survive too (diffusers' kohya path gets per-layer alphas wrong)
    lora = lora.map_layers(lambda k, layer: L.LoRALayer(down=layer.down, up=layer.up, alpha=1.0 + len(k) % 5))
    keys = sorted(lora.layers)
    layers = dict(lora.layers)
    layers[keys[1]] = L.LoRALayer(down=layers[keys[1]].down[:2], up=layers[keys[1]].up[:, :2], alpha=7.0)
    lora = lora.replace(layers=layers)
    path = save_lora(lora, tmp_path / "d.safetensors", "diffusers")
    pipe = tiny.tiny_sd1_pipeline() if family == "sd1" else tiny.tiny_sdxl_pipeline()
    deltas = _fused_deltas(pipe, family, path, lora)
    assert not [m for m in warnings_log if "unexpected" in m.lower() or "missing" in m.lower()], warnings_log
    worst = max((deltas[k] - L.delta(layer)).abs().max().item() for k, layer in lora.layers.items())
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_file_loads_in_diffusers(tmp_path, warnings_log, family):
    # alpha == rank: diffusers' kohya converter mis-maps some per-layer alphas otherwise (see the note in README)
    lora = sample_lora(family, rank=4, alpha=4.0, attention_only=True)
    path = save_lora(lora, tmp_path / "k.safetensors", "kohya")
    pipe = tiny.tiny_sd1_pipeline() if family == "sd1" else tiny.tiny_sdxl_pipeline()
    deltas = _fused_deltas(pipe, family, path, lora)
    assert not [m for m in warnings_log if "unexpected" in m.lower() or "missing" in m.lower()], warnings_log
    worst = max((deltas[k] - L.delta(layer)).abs().max().item() for k, layer in lora.layers.items())
    assert worst <= 1e-6, worst


def test_peft_file_loads_with_set_peft_model_state_dict(tmp_path):
    import json

    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file, safe_open

    lora = L.filter_layers(sample_lora("sd1", rank=4, alpha=2.0, attention_only=True), "unet.")
    path = save_lora(lora, tmp_path / "p.safetensors", "peft", component="unet")
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["adapter_config"])
    unet = tiny.tiny_unet("sd1")
    names = keymap.unet_canonical_keys(unet, "sd1")
    before = {k: dict(unet.named_modules())[names[k]].weight.detach().clone() for k in lora.layers}
    model = get_peft_model(unet, LoraConfig(**config))
    result = set_peft_model_state_dict(model, load_file(str(path)))
    assert not result.unexpected_keys
    merged = model.merge_and_unload()
    worst = max((dict(merged.named_modules())[names[k]].weight - before[k] - L.delta(layer)).abs().max().item()
                for k, layer in lora.layers.items())
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("operation", ["resize", "combine", "extract"])
def test_math_outputs_load_in_diffusers_with_every_key(tmp_path, warnings_log, operation):
    from lora_ops.combine import combine
    from lora_ops.extract import extract
    from lora_ops.files import load_lora
    from lora_ops.resize import resize

    a = sample_lora("sd1", rank=8, alpha=4.0, attention_only=True, seed=1)
    if operation == "resize":
        out, _ = resize(a, "sv_fro:0.95")
    elif operation == "combine":
        out, _ = combine([(a, 0.7, 0.7), (sample_lora("sd1", rank=4, attention_only=True, seed=2), 0.5, 0.5)],
                         "svd", 6)
    else:
        pipe = tiny.tiny_sd1_pipeline()
        base = {k: dict(m.named_modules())[p].weight.detach().clone() for k, (p, m) in _pipeline_modules(
            pipe, "sd1").items()}
        tuned = {k: w + L.delta(a[k]).reshape(w.shape) if k in a.layers else w for k, w in base.items()}
        out, _ = extract(base, tuned, 8)
    path = save_lora(out, tmp_path / f"{operation}.safetensors", "diffusers")
    assert L.equal(load_lora(path), out)
    deltas = _fused_deltas(tiny.tiny_sd1_pipeline(), "sd1", path, out)
    assert not [m for m in warnings_log if "unexpected" in m.lower() or "missing" in m.lower()], warnings_log
    worst = max((deltas[k] - L.delta(layer).reshape(deltas[k].shape)).abs().max().item()
                for k, layer in out.layers.items())
    assert worst <= 1e-6, worst


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_folder_reads_with_peft_scaling(tmp_path, use_rslora):
    """A PEFT adapter folder written by PEFT itself (save_pretrained) reads to the ΔW PEFT applies: alpha/r, or
    alpha/√r with rsLoRA (which an earlier reader ignored, loading such files √r times too weak)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lora_ops.files import load_lora

    torch.manual_seed(0)
    block = torch.nn.ModuleDict({"proj_in": torch.nn.Linear(12, 16)})  # SD 1.x's input_blocks.1.1.proj_in
    base = torch.nn.ModuleDict({"input_blocks": torch.nn.ModuleDict({"1": torch.nn.ModuleDict({"1": block})})})
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["proj_in"], use_rslora=use_rslora,
                        init_lora_weights=False)
    model = get_peft_model(base, config)
    model.save_pretrained(tmp_path / "adapter")
    layer = model.base_model.model.input_blocks["1"]["1"]["proj_in"]
    expected = layer.get_delta_weight("default")  # PEFT's own ΔW, scaling included
    lora = load_lora(tmp_path / "adapter", family="sd1")
    (key,) = lora.layers
    assert key == "unet.input_blocks.1.1.proj_in"
    torch.testing.assert_close(L.delta(lora.layers[key]), expected, rtol=1e-6, atol=1e-7)
