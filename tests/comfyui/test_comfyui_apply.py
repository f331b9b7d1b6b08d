"""Apply / Apply Stack / Merge & Unload inside real ComfyUI (in-process, CPU), on a tiny SD 1.5-layout model.

Checked against ComfyUI 0.3.64 (comfyui_version.py; commit a125cd84b054, 2025-10-12). Run with
``COMFYUI_PATH=<checkout> COMFYUI_STUBS=<folder with a torchvision stub, if needed> pytest tests/comfyui``.

Sampling goes through ComfyUI's own KSampler, so the patches are applied (and removed again) by ComfyUI's model
management exactly as in a real graph. References are built independently: a fresh model whose weights already
hold W + Σ s·ΔW (ΔW from the LoRA value), compared by KSampler output.
"""

import importlib
import json

import pytest
import torch
from helpers import canonical_shapes, import_pack, sample_lora

from lora_ops.files import save_lora

pack = import_pack()
ours = pack.nodes
LoraValueError = pack.lora_ops.errors.LoraValueError

TOL = 1e-5  # relative to the output's scale (fp32 UNet; seen: 0.0)
TOL_CLIP = 2e-3  # ComfyUI keeps text encoders in fp16 on the CPU: references differ by weight rounding (seen: 9e-4)
TO_Q = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"


def rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def files(loras_dir):
    """A: every UNet + text-encoder layer, diffusers/PEFT format (``unet.…attn1.to_q.lora_A.weight``).
    B: attention layers only, kohya format, another rank and alpha."""
    save_lora(sample_lora("sd1", rank=4, alpha=2.0, seed=0), loras_dir / "a_diffusers.safetensors", "diffusers")
    save_lora(sample_lora("sd1", rank=2, alpha=1.0, seed=1, attention_only=True), loras_dir / "b_kohya.safetensors",
              "kohya")
    return {name: ours.LoraOpsLoad().load(f"{name}.safetensors")[0] for name in ("a_diffusers", "b_kohya")}


class Graph:
    """The few ComfyUI nodes a text-to-image graph needs, with fixed prompts, seed and size."""

    def __init__(self, comfy):
        self.nodes = comfy.nodes

    def encode(self, clip):
        encode = self.nodes.CLIPTextEncode().encode
        return encode(clip, "a photo of a cat")[0], encode(clip, "blurry")[0]

    def sample(self, model, clip):
        positive, negative = self.encode(clip)
        latent = self.nodes.EmptyLatentImage().generate(64, 64, 1)[0]
        (out,) = self.nodes.KSampler().sample(model, 7, 2, 2.0, "euler", "normal", positive, negative, latent)
        return out["samples"]

    def cond(self, clip):
        return self.encode(clip)[0][0][0]


@pytest.fixture
def graph(comfy):
    return Graph(comfy)


def fused(unet_sd, clip_sd, items):
    """Reference weights: W + Σ s·ΔW in fp32, straight from the LoRA values (UNet and CLIP-L state dicts).

    ComfyUI stores the CLIP in fp16 on the CPU, so its base weights are rounded to fp16 first, as loading does.
    """
    unet = {k: v.clone() for k, v in unet_sd.items()}
    clip = {k: v.half().float() for k, v in clip_sd.items()}
    for lora, sm, sc in items:
        for key, layer in lora.layers.items():
            part, path = key.split(".", 1)
            target, name, s = (unet, f"{path}.weight", sm) if part == "unet" else (
                clip, f"clip_l.transformer.{path}.weight", sc)
            target[name] += s * layer.delta().reshape(target[name].shape)
    return unet, clip


def test_diffusers_lora_applies_fully_where_comfyui_drops_attention(comfy, build, graph, files, unet_sd, clip_sd,
                                                                    caplog):
    model, clip = build.model(), build.clip()
    base = graph.sample(model, clip)
    lora = files["a_diffusers"]
    new_model, new_clip, report = ours.LoraOpsApply().apply(model, lora, 1.0, 1.0, clip=clip)

    n_unet = sum(k.startswith("unet.") for k in lora.layers)
    assert report.startswith(f"{len(lora.layers)} of {len(lora.layers)} LoRA layers matched (100%)"), report
    assert len(new_model.patches) == n_unet and TO_Q in new_model.patches
    assert len(new_clip.patcher.patches) == len(lora.layers) - n_unet
    assert not model.patches and not clip.patcher.patches  # the inputs are untouched

    (theirs,) = comfy.nodes.LoraLoaderModelOnly().load_lora_model_only(model, "a_diffusers.safetensors", 1.0)
    dropped = set(new_model.patches) - set(theirs.patches)
    assert TO_Q in dropped and len(theirs.patches) < n_unet, f"ComfyUI took {len(theirs.patches)} of {n_unet}"
    assert all(".attn1." in k or ".attn2." in k for k in dropped)
    assert "lora key not loaded" in caplog.text

    ref_unet, ref_clip = fused(unet_sd, clip_sd, [(lora, 1.0, 1.0)])
    applied = graph.sample(new_model, new_clip)
    assert rel_diff(applied, base) > 1e-2
    assert rel_diff(applied, graph.sample(build.model(ref_unet), new_clip)) <= TOL
    assert rel_diff(graph.cond(new_clip), graph.cond(build.clip(ref_clip))) <= TOL_CLIP
    assert torch.equal(graph.sample(model, clip), base)  # the base model still gives the base output


def test_stacking_two_loras_equals_the_sum(comfy, build, graph, files, unet_sd, clip_sd):
    model, clip = build.model(), build.clip()
    rows = json.dumps([
        {"lora": "a_diffusers.safetensors", "strength_model": 0.7, "strength_clip": 0.3},
        {"lora": "b_kohya.safetensors", "strength_model": -0.5, "strength_clip": 1.0},
    ])
    (stack,) = ours.LoraOpsStack().stack(rows)
    stacked_model, stacked_clip, report = ours.LoraOpsApplyStack().apply(model, stack, clip=clip)
    assert "LoRA 1:" in report and "LoRA 2:" in report and report.count("(100%)") == 2
    stacked = graph.sample(stacked_model, stacked_clip)

    a, b = files["a_diffusers"], files["b_kohya"]
    ref_unet, ref_clip = fused(unet_sd, clip_sd, [(a, 0.7, 0.3), (b, -0.5, 1.0)])
    assert rel_diff(stacked, graph.sample(build.model(ref_unet), stacked_clip)) <= TOL
    assert rel_diff(graph.cond(stacked_clip), graph.cond(build.clip(ref_clip))) <= TOL_CLIP

    m1, c1, _ = ours.LoraOpsApply().apply(model, a, 0.7, 0.3, clip=clip)
    m2, c2, _ = ours.LoraOpsApply().apply(m1, b, -0.5, 1.0, clip=c1)
    assert rel_diff(graph.sample(m2, c2), stacked) <= TOL


def test_merge_and_unload_equals_the_patched_model(comfy, build, graph, files):
    model, clip = build.model(), build.clip()
    base = graph.sample(model, clip)
    a, b = files["a_diffusers"], files["b_kohya"]
    applied_model, applied_clip, _ = ours.LoraOpsApply().apply(model, a, 0.8, 0.6, clip=clip)
    applied = graph.sample(applied_model, applied_clip)

    merged_model, merged_clip = ours.LoraOpsMergeUnload().merge(applied_model, applied_clip)
    for patcher in (merged_model, merged_clip.patcher):
        kinds = {p[1][0] for patches in patcher.patches.values() for p in patches}
        assert kinds == {"set"}  # the merged weights themselves, no LoRA left to compute
    assert set(merged_model.patches) == set(applied_model.patches)
    merged = graph.sample(merged_model, merged_clip)
    assert rel_diff(merged, applied) <= 1e-6
    assert torch.equal(graph.cond(merged_clip), graph.cond(applied_clip))  # fp16 CLIP: cast back exactly alike

    assert torch.equal(graph.sample(model, clip), base)  # the base MODEL still gives the base output
    assert torch.equal(graph.sample(applied_model, applied_clip), applied)  # and the input its own
    assert not model.patches and len(applied_model.patches[TO_Q]) == 1

    on_top, on_top_clip, _ = ours.LoraOpsApply().apply(merged_model, b, -0.5, 1.0, clip=merged_clip)
    both, both_clip, _ = ours.LoraOpsApply().apply(applied_model, b, -0.5, 1.0, clip=applied_clip)
    assert rel_diff(graph.sample(on_top, both_clip), graph.sample(both, both_clip)) <= TOL
    assert rel_diff(graph.cond(on_top_clip), graph.cond(both_clip)) <= TOL_CLIP  # fp16: rounded once vs twice


def test_a_wrong_family_lora_is_refused_inside_comfyui(build):
    model, clip = build.model(), build.clip()
    fixtures = importlib.import_module(pack.__name__ + ".lora_ops.testing.fixtures")
    sdxl = fixtures.random_lora(canonical_shapes("sdxl", attention_only=True), family="sdxl")
    with pytest.raises(LoraValueError, match="SDXL LoRA, the model is SD1.x"):
        ours.LoraOpsApply().apply(model, sdxl, 1.0, 1.0, clip=clip)
    assert not model.patches
