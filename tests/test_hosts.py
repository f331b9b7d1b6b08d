"""DiffusersHost on the tiny SD 1.5- and SDXL-shaped pipelines: applied output equals diffusers' own LoRA loading,
merged equals applied, unmerge restores every weight bit-for-bit, and refusals leave the model untouched."""

import logging

import pytest
import torch
from helpers import canonical_shapes, sample_lora

from lora_ops import lora as L
from lora_ops.errors import LoraValueError
from lora_ops.files import load_lora, save_lora
from lora_ops.hosts import DiffusersHost, LoraHost
from lora_ops.testing import tiny
from lora_ops.testing.fixtures import random_lora

FAMILIES = ("sd1", "sdxl")
TOL = 1e-5


def make_pipe(family):
    return tiny.tiny_sd1_pipeline() if family == "sd1" else tiny.tiny_sdxl_pipeline()


def run(pipe):
    """Images in [0, 1] after 2 steps (fp32, fixed seed): what a user sees, and a scale where 1e-5 means something."""
    return pipe(
        "a photo of a cat",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


def models(pipe):
    return [m for m in (pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]


def state(pipe):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models(pipe)]


def same_state(a, b):
    return all(set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def no_hooks(pipe):
    """No forward hook left on any Linear/Conv2d (transformers keeps its own output-capturing hooks on CLIP blocks)."""
    layers = [m for model in models(pipe) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return all(not m._forward_hooks and not m._forward_hooks_with_kwargs for m in layers)


def snapshot(lora):
    return lora.map_layers(lambda _k, layer: layer.with_tensors({n: t.clone() for n, t in layer.tensors().items()}))


def diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A random rank-4, alpha-3 LoRA on the attention layers of UNet + text encoders, in diffusers format."""
    root = tmp_path_factory.mktemp("loras")
    return {
        family: save_lora(
            sample_lora(family, rank=4, alpha=3.0, attention_only=True), root / f"{family}.safetensors", "diffusers"
        )
        for family in FAMILIES
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_matches_diffusers_and_merge_unmerge_round_trips(lora_file, family):
    lora = load_lora(lora_file[family])
    before_lora = snapshot(lora)
    pipe = make_pipe(family)
    host = DiffusersHost(pipe)
    assert isinstance(host, LoraHost) and host.family == family
    base_state, base = state(pipe), run(pipe)

    report = host.apply([(lora, 1.0, 1.0)])
    assert report.fraction == 1.0 and len(report.matched) == len(lora)
    assert not no_hooks(pipe)
    assert same_state(state(pipe), base_state)  # applying touches no weight
    applied = run(pipe)
    assert diff(applied, base) > 1e-2  # the LoRA does something

    reference = make_pipe(family)
    reference.load_lora_weights(str(lora_file[family]))
    assert diff(applied, run(reference)) <= TOL

    host.merge()
    assert diff(run(pipe), applied) <= TOL
    host.unmerge()
    assert same_state(state(pipe), base_state)
    assert torch.equal(run(pipe), applied)  # hooks active again
    host.remove()
    assert no_hooks(pipe) and torch.equal(run(pipe), base)
    assert L.equal(lora, before_lora)


@pytest.mark.parametrize("family", FAMILIES)
def test_strengths_match_diffusers_set_adapters(lora_file, family):
    lora = load_lora(lora_file[family])
    pipe = make_pipe(family)
    host = DiffusersHost(pipe)
    host.apply([(lora, 0.5, 1.0)])
    with_text = run(pipe)
    host.remove()
    host.apply([(lora, 0.5, 0.0)])
    ours = run(pipe)
    assert diff(ours, with_text) > 1e-3  # the text-encoder layers matter, so strength 0 there is a real check

    reference = make_pipe(family)
    reference.load_lora_weights(str(lora_file[family]), adapter_name="a")
    weights = {"unet": 0.5, "text_encoder": 0.0} | ({"text_encoder_2": 0.0} if family == "sdxl" else {})
    reference.set_adapters(["a"], adapter_weights=weights)
    assert diff(ours, run(reference)) <= TOL

    # and at the weights: the UNet moved by 0.5·ΔW, the text encoders not at all
    before = {k: host.module(k).weight.detach().clone() for k in lora.layers}
    host.merge()
    for key, layer in lora.layers.items():
        moved = host.module(key).weight - before[key]
        expected = 0.5 * L.delta(layer) if key.startswith("unet.") else torch.zeros_like(moved)
        assert diff(moved, expected) <= 1e-6, key
    host.remove()


def _sum_lora(items):
    """Σ strength·ΔW as one LoRA, by concatenating the (scaled) factors: rank adds up, alpha = rank (scale 1)."""
    layers = {}
    for key in items[0][0].layers:
        downs, ups = [], []
        for lora, sm, st in items:
            layer = lora.layers[key]
            downs.append(layer.down)
            ups.append(layer.up * layer.scale * (st if L.is_text_encoder_key(key) else sm))
        layers[key] = L.LoRALayer(down=torch.cat(downs), up=torch.cat(ups, dim=1))
    return L.LoRA(layers, family=items[0][0].family)


def test_stacking_equals_the_sum():
    a = sample_lora("sd1", rank=4, alpha=3.0, attention_only=True, seed=1)
    b = sample_lora("sd1", rank=2, alpha=5.0, attention_only=True, seed=2)
    items = [(a, 0.7, 0.4), (b, -0.3, 1.2)]
    total = _sum_lora(items)

    pipe = make_pipe("sd1")
    host = DiffusersHost(pipe)
    host.apply([(total, 1.0, 1.0)])
    expected = run(pipe)
    host.remove()

    host.apply(items)  # one call, two LoRAs
    together = run(pipe)
    host.remove()
    report_a, report_b = host.apply(items[:1]), host.apply(items[1:])  # two calls stack too
    separate = run(pipe)
    host.merge()
    merged = run(pipe)
    host.remove()

    assert report_a.fraction == report_b.fraction == 1.0
    assert diff(together, expected) <= TOL
    assert diff(separate, expected) <= TOL
    assert diff(merged, expected) <= TOL


def _mixed_conv_lora():
    """Every UNet/TE layer (convs included), with LoCon, Tucker, LoHa, LoKr and a linear LoRA on a 1×1 conv."""
    shapes = canonical_shapes("sd1")
    lora = random_lora(shapes, rank=4, alpha=3.0, family="sd1", std=0.05)
    g = torch.Generator().manual_seed(5)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    layers = dict(lora.layers)
    tucker_key = "unet.input_blocks.1.0.in_layers.2"  # 3×3 conv
    out, cin = shapes[tucker_key][:2]
    layers[tucker_key] = L.LoRALayer(down=rnd(4, cin, 1, 1), up=rnd(out, 4, 1, 1), mid=rnd(4, 4, 3, 3), alpha=2.0)
    loha_key = "unet.input_blocks.2.0.in_layers.2"  # 3×3 conv, LoHa with flat factors: 2-D ΔW
    out, cin = shapes[loha_key][:2]
    parts = {
        "hada_w1_a": rnd(out, 2),
        "hada_w1_b": rnd(2, cin * 9),
        "hada_w2_a": rnd(out, 2),
        "hada_w2_b": rnd(2, cin * 9),
    }
    layers[loha_key] = L.LycorisLayer("loha", parts, alpha=1.0)
    lokr_key = "unet.time_embed.0"  # Linear (128, 32)
    assert shapes[lokr_key] == (128, 32)
    layers[lokr_key] = L.LycorisLayer(
        "lokr", {"lokr_w1": rnd(4, 2), "lokr_w2_a": rnd(32, 2), "lokr_w2_b": rnd(2, 16)}, alpha=2.0
    )
    proj_key = "unet.input_blocks.1.1.proj_in"  # 1×1 conv in SD 1.5
    out, cin = shapes[proj_key][:2]
    layers[proj_key] = L.LoRALayer(down=rnd(4, cin), up=rnd(out, 4), alpha=4.0)
    assert "unet.input_blocks.3.0.op" in layers  # a stride-2 conv keeps its LoCon layer
    return lora.replace(layers=layers)


def test_conv_tucker_lycoris_layers_apply_as_they_merge():
    lora = _mixed_conv_lora()
    before_lora = snapshot(lora)
    pipe = make_pipe("sd1")
    host = DiffusersHost(pipe)
    base_state, base = state(pipe), run(pipe)
    assert host.apply([(lora, 0.8, 0.6)]).fraction == 1.0
    applied = run(pipe)
    assert diff(applied, base) > 1e-2
    host.merge()
    assert diff(run(pipe), applied) <= TOL
    host.unmerge()
    assert same_state(state(pipe), base_state)
    host.remove()
    assert L.equal(lora, before_lora)


def test_wrong_family_is_refused_with_the_cause():
    pipe = make_pipe("sd1")
    host = DiffusersHost(pipe)
    with pytest.raises(LoraValueError, match=r"looks like an SDXL LoRA, the model is SD1\.x"):
        host.apply([(sample_lora("sdxl", attention_only=True), 1.0, 1.0)])
    sdxl_unknown = sample_lora("sdxl", attention_only=True).replace(family=None)  # detected from its keys
    with pytest.raises(LoraValueError, match="SDXL LoRA"):
        host.apply([(sdxl_unknown, 1.0, 1.0)])
    assert no_hooks(pipe)


def test_partial_match_applies_the_rest_and_reports_it(caplog):
    lora = sample_lora("sd1", rank=4, alpha=3.0, attention_only=True)
    n_fake = len(lora) // 9  # 10% of the result
    g = torch.Generator().manual_seed(3)
    fake = {
        f"unet.fake_blocks.{i}.attn1.to_q": L.LoRALayer(
            down=torch.randn(4, 32, generator=g), up=torch.randn(32, 4, generator=g)
        )
        for i in range(n_fake)
    }
    noisy = lora.replace(layers={**lora.layers, **fake})

    pipe = make_pipe("sd1")
    host = DiffusersHost(pipe)
    host.apply([(lora, 1.0, 1.0)])
    clean = run(pipe)
    host.remove()
    with caplog.at_level(logging.WARNING, logger="lora_ops"):
        report = host.apply([(noisy, 1.0, 1.0)])
    assert report.fraction == pytest.approx(len(lora) / len(noisy)) and 0.89 < report.fraction < 0.91
    assert dict(report.unmatched) == {"unet.fake_blocks.*": tuple(fake)}
    assert f"unet.fake_blocks.*: {n_fake} layers" in report.summary()
    assert any("partial LoRA match" in r.getMessage() for r in caplog.records)
    assert torch.equal(run(pipe), clean)


def test_nan_merge_is_refused_with_the_model_untouched():
    lora = sample_lora("sd1", rank=4, alpha=3.0, attention_only=True)
    key = sorted(k for k in lora.layers if k.startswith("unet."))[3]
    bad = lora.layers[key]
    up = bad.up.clone()
    up[0, 0] = float("nan")
    poisoned = lora.replace(layers={**lora.layers, key: L.LoRALayer(down=bad.down, up=up, alpha=bad.alpha)})

    pipe = make_pipe("sd1")
    host = DiffusersHost(pipe)
    base_state = state(pipe)
    good = host.apply([(sample_lora("sd1", attention_only=True, seed=7), 1.0, 1.0)])
    host.merge()  # a first, good merge: the refused one must keep it too
    merged_state = state(pipe)
    host.apply([(poisoned, 1.0, 1.0)])
    with pytest.raises(LoraValueError, match="NaN/Inf") as err:
        host.merge()
    assert err.value.key is not None and err.value.key.startswith("unet.")
    assert same_state(state(pipe), merged_state)
    assert good.fraction == 1.0
    host.remove()  # still restorable after the refusal
    assert no_hooks(pipe) and same_state(state(pipe), base_state)


def test_merge_and_unload_leaves_plain_modules():
    lora = sample_lora("sdxl", rank=4, alpha=3.0, attention_only=True)
    before_lora = snapshot(lora)
    pipe = make_pipe("sdxl")
    host = DiffusersHost(pipe)
    base_state = state(pipe)
    host.apply([(lora, 1.0, 0.7)])
    applied = run(pipe)
    host.merge_and_unload()
    assert no_hooks(pipe)
    assert diff(run(pipe), applied) <= TOL
    assert not same_state(state(pipe), base_state)
    assert L.equal(lora, before_lora)
    host.remove()  # nothing left to remove: the merged weights stay
    assert diff(run(pipe), applied) <= TOL


def test_dora_is_refused_before_anything_changes():
    lora = sample_lora("sd1", attention_only=True)
    key = next(iter(lora.layers))
    layer = lora.layers[key]
    dora = lora.replace(
        layers={
            **lora.layers,
            key: L.LoRALayer(
                down=layer.down, up=layer.up, alpha=layer.alpha, dora_scale=torch.ones(layer.up.shape[0], 1)
            ),
        }
    )
    pipe = make_pipe("sd1")
    host = DiffusersHost(pipe)
    with pytest.raises(LoraValueError, match="DoRA not supported"):
        host.apply([(sample_lora("sd1", attention_only=True, seed=4), 1.0, 1.0), (dora, 1.0, 1.0)])
    assert no_hooks(pipe)


def test_targets_and_family_come_from_the_pipeline():
    pipe = make_pipe("sdxl")
    host = DiffusersHost(pipe)
    assert host.family == "sdxl"
    assert host.targets() == canonical_shapes("sdxl")
    with pytest.raises(LoraValueError, match="unknown UNet family"):
        DiffusersHost(pipe, family="sd9")
    with pytest.raises(LoraValueError, match="layout is 'sdxl'"):
        DiffusersHost(pipe, family="sd1")


def test_bf16_merge_is_fp32_add_cast_back_and_unmerge_is_exact():
    lora = sample_lora("sd1", rank=4, alpha=3.0, attention_only=True)
    pipe = make_pipe("sd1").to(torch.bfloat16)
    host = DiffusersHost(pipe)
    base_state = state(pipe)
    host.apply([(lora, 0.9, 0.5)])
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g).to(torch.bfloat16)
    context = torch.randn(1, 77, 32, generator=g).to(torch.bfloat16)
    applied = pipe.unet(sample, 10, encoder_hidden_states=context).sample
    assert applied.dtype == torch.bfloat16
    before = {k: host.module(k).weight.detach().clone() for k in lora.layers}
    host.merge()
    for key, layer in lora.layers.items():
        strength = 0.5 if key.startswith("te1.") else 0.9
        expected = (before[key].float() + strength * L.delta(layer)).to(torch.bfloat16)
        assert torch.equal(host.module(key).weight, expected), key
    merged = pipe.unet(sample, 10, encoder_hidden_states=context).sample
    assert diff(merged.float(), applied.float()) <= 0.05 * applied.float().abs().max().item()  # bf16 rounding
    host.unmerge()
    assert same_state(state(pipe), base_state)
    host.remove()
