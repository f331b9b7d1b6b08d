"""Apply / Apply Stack / Merge & Unload nodes on a tiny SD 1.5-shaped diffusers pipeline (no ComfyUI needed).

The nodes are imported the way ComfyUI imports the pack, so the LoRA values come from the pack's own library
(``pack.lora_ops``), exactly as they would inside ComfyUI. The real-ComfyUI side is in ``tests/comfyui/``.
"""

import copy
import importlib

import pytest
import torch
from helpers import canonical_shapes, import_pack

pack = import_pack()
nodes = pack.nodes
errors = pack.lora_ops.errors
hosts = pack.lora_ops.hosts
fixtures = importlib.import_module(pack.__name__ + ".lora_ops.testing.fixtures")
tiny = importlib.import_module(pack.__name__ + ".lora_ops.testing.tiny")
DiffusersModel = nodes.diffusers_model.DiffusersModel
StackEntry = nodes.types.StackEntry
comfy_host = nodes.comfy_host

TOL = 1e-5


def pack_lora(family="sd1", seed=0, **kw):
    """A random LoRA on the attention/MLP layers of the UNet and text encoder(s), as the pack's LoRA value."""
    return fixtures.random_lora(canonical_shapes(family, attention_only=True), family=family, seed=seed, **kw)


def run(pipe):
    """Images in [0, 1] after 2 steps (fp32, fixed seed)."""
    return pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


def output(value):
    with value.activated() as pipe:
        return run(pipe)


def weights(pipe):
    return {f"{name}.{k}": v.detach().clone() for name in ("unet", "text_encoder")
            for k, v in getattr(pipe, name).state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def no_hooks(pipe):
    layers = [m for part in (pipe.unet, pipe.text_encoder) for m in part.modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return all(not m._forward_hooks and not m._forward_hooks_with_kwargs for m in layers)


def fused_copy(pipe, items):
    """An independent reference: a copy of the pipeline with W += Σ s·ΔW written straight into the weights."""
    ref = copy.deepcopy(pipe)
    host = hosts.DiffusersHost(ref)
    with torch.no_grad():
        for lora, sm, st in items:
            for key, layer in lora.layers.items():
                weight = host.module(key).weight
                weight += (st if key.startswith("te") else sm) * layer.delta().reshape(weight.shape)
    return ref


@pytest.fixture(scope="module")
def base():
    return DiffusersModel(tiny.tiny_sd1_pipeline())


@pytest.fixture(scope="module")
def base_output(base):
    return output(base)


@pytest.fixture(scope="module")
def loras():
    return pack_lora(seed=0), pack_lora(seed=1, alpha=3.0)


def test_apply_equals_host_output_and_leaves_the_input_untouched(base, base_output, loras):
    lora = loras[0]
    before = weights(base.pipe)
    model, clip, report = nodes.LoraOpsApply().apply(base, lora, 0.8, 0.5, clip=base)
    assert clip is model and "100%" in report and "SD1.x LoRA" in report
    applied = output(model)

    host = hosts.DiffusersHost(base.pipe)
    host.apply([(lora, 0.8, 0.5)])
    expected = run(base.pipe)
    host.remove()

    assert torch.allclose(applied, expected, atol=1e-6, rtol=0)
    assert (applied - base_output).abs().max() > 1e-3  # the LoRA really changes the image
    assert base.items == () and model.items == ((lora, 0.8, 0.5),)
    assert same_weights(weights(base.pipe), before) and no_hooks(base.pipe)
    assert torch.equal(output(base), base_output)


def test_without_clip_the_text_encoder_layers_are_skipped_and_reported(base, loras):
    model, clip, report = nodes.LoraOpsApply().apply(base, loras[0], 1.0, 1.0)
    te_layers = [k for k in loras[0].layers if k.startswith("te1.")]
    assert clip is None and te_layers
    assert f"{len(te_layers)} text-encoder layers not applied: no CLIP connected" in report
    assert not any(k.startswith("te") for k in model.items[0][0].layers)


def test_apply_stack_of_two_equals_the_sum(base, loras):
    a, b = loras
    stack = (StackEntry(a, "a", 0.7, 0.3), StackEntry(b, "b", -0.5, 1.0))
    model, clip, report = nodes.LoraOpsApplyStack().apply(base, stack, clip=base)
    assert "LoRA 1:" in report and "LoRA 2:" in report
    stacked = output(model)

    expected = run(fused_copy(base.pipe, [(a, 0.7, 0.3), (b, -0.5, 1.0)]))
    assert (stacked - expected).abs().max().item() <= TOL

    first, first_clip, _ = nodes.LoraOpsApply().apply(base, a, 0.7, 0.3, clip=base)
    chained, _, _ = nodes.LoraOpsApply().apply(first, b, -0.5, 1.0, clip=first_clip)
    assert torch.allclose(output(chained), stacked, atol=1e-6, rtol=0)


def test_empty_stack_returns_the_inputs(base):
    model, clip, report = nodes.LoraOpsApplyStack().apply(base, (), clip=base)
    assert model is base and clip is base and "nothing applied" in report


def test_merge_and_unload_equals_the_applied_output(base, base_output, loras):
    before = weights(base.pipe)
    applied, applied_clip, _ = nodes.LoraOpsApply().apply(base, loras[1], 1.2, 0.6, clip=base)
    expected = output(applied)

    merged, merged_clip = nodes.LoraOpsMergeUnload().merge(applied, applied_clip)
    assert merged_clip is merged and merged.items == () and merged.pipe is not base.pipe
    assert no_hooks(merged.pipe)
    assert (run(merged.pipe) - expected).abs().max().item() <= TOL

    assert same_weights(weights(base.pipe), before)  # the input's pipeline was not touched
    assert torch.equal(output(applied), expected) and torch.equal(output(base), base_output)


def test_a_wrong_family_lora_is_refused_with_its_cause(base):
    sdxl = pack_lora("sdxl")
    with pytest.raises(errors.LoraValueError, match="SDXL LoRA, the model is SD1.x"):
        nodes.LoraOpsApply().apply(base, sdxl, 1.0, 1.0, clip=base)
    assert base.items == () and no_hooks(base.pipe)


def test_inputs_that_cannot_work_are_refused(base, loras):
    lora = loras[0]
    with pytest.raises(errors.LoraValueError, match="neither a ComfyUI model nor a diffusers pipeline"):
        nodes.LoraOpsApply().apply(object(), lora, 1.0, 1.0)
    with pytest.raises(errors.LoraValueError, match="neither"):
        nodes.LoraOpsMergeUnload().merge(object())
    other, _, _ = nodes.LoraOpsApply().apply(base, lora, 1.0, 1.0, clip=base)
    with pytest.raises(errors.LoraValueError, match="same pipeline"):
        nodes.LoraOpsApply().apply(base, lora, 1.0, 1.0, clip=other)
    te_only = pack.lora_ops.lora.filter_layers(lora, "te1.")
    with pytest.raises(errors.LoraValueError, match="only patches the text encoder"):
        nodes.LoraOpsApply().apply(base, te_only, 1.0, 1.0)
    with pytest.raises(errors.LoraValueError, match="finite"):
        nodes.LoraOpsApply().apply(base, lora, float("nan"), 1.0, clip=base)
    with pytest.raises(errors.LoraValueError, match="already activated"), base.activated(), other.activated():
        pass
    assert no_hooks(base.pipe)


class _FakePatcher:
    """Just enough of a ModelPatcher for the key-space helpers (no ComfyUI needed)."""

    def __init__(self, sd):
        self._sd = sd
        self.model, self.patches = None, {}

    def clone(self):
        return self

    def add_patches(self, *_):
        return []

    def model_state_dict(self):
        return self._sd


class _FakeClip:
    def __init__(self, sd):
        self.cond_stage_model = torch.nn.Module()
        self.cond_stage_model.state_dict = lambda: sd


def test_comfy_key_spaces_map_to_canonical_keys():
    w = torch.zeros
    model = _FakePatcher({
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": w(4, 4),
        "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias": w(4),
        "model_ema.decay": w(()),
    })
    clip = _FakeClip({
        "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": w(3, 3),
        "clip_g.transformer.text_projection.weight": w(2, 2),
        "clip_l.logit_scale": w(()),
    })
    assert comfy_host.is_model_patcher(model) and not comfy_host.is_model_patcher(clip)
    assert comfy_host.unet_targets(model) == {"unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q": (4, 4)}
    assert comfy_host.clip_targets(clip) == {
        "te1.text_model.encoder.layers.0.self_attn.q_proj": (3, 3),
        "te2.text_projection": (2, 2),
    }
    assert comfy_host.model_family(model) == "sd1"
    assert comfy_host._patch_key("te2.text_projection") == "clip_g.transformer.text_projection.weight"
    assert comfy_host._patch_key("unet.out.2") == "diffusion_model.out.2.weight"
