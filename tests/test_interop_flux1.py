"""Our FLUX.1 files load in diffusers and PEFT themselves, with every key used and the ΔW we meant, on every Linear.

diffusers-format output (``transformer.<diffusers module>.lora_A/B``, ranks and alphas in ``lora_adapter_metadata``)
goes through ``FluxPipeline.load_lora_weights`` (lora_state_dict → load_lora_into_transformer →
``transformer.load_lora_adapter``) and through those lower-level calls by hand; PEFT-format output through
``set_peft_model_state_dict``. The reference ΔW of each diffusers module is independent of our split/swap code:
the full ΔW of each BFL weight split and renamed by `lora_ops.testing.tiny_flux.bfl_to_diffusers`.

Not tested here: kohya-format FLUX.1 files in diffusers. Its kohya converter
(``diffusers.loaders.lora_conversion_utils._convert_kohya_flux_lora_to_diffusers``) hard-codes the released model:
19 double blocks, 38 single blocks and ``linear1`` split at [3072, 3072, 3072, 12288] rows, so it cannot load a
kohya file for the tiny transformer (hidden 128, 2 + 2 blocks); the kohya output is checked against our own host
and readers instead (tests/test_hosts_flux1.py).
"""

import functools
import json

import pytest
import torch
from test_hosts_flux1 import TOL, assert_deltas, flux_lora, moved, reference_deltas, state

from lora_ops import lora as L
from lora_ops.files import load_lora, save_lora
from lora_ops.hosts import DiffusersHost
from lora_ops.keymap.model_keys import te_canonical_keys
from lora_ops.testing import tiny
from lora_ops.testing.tiny_flux import tiny_flux_forward, tiny_flux_transformer


def complaints(messages):
    words = ("unexpected", "missing", "unsuccessful", "size mismatch", "no lora keys")
    return [m for m in messages if any(w in m.lower() for w in words)]


@functools.cache
def clip_keys() -> dict[str, str]:
    return te_canonical_keys(tiny.tiny_text_encoder("clip-l"), "te1")


def every_linear_lora(text_encoder: bool = True) -> L.LoRA:
    """Every BFL weight (so every diffusers Linear, norm_out.linear with its swapped halves too) and every Linear
    of the CLIP-L text encoder, with ranks and alphas that differ per layer; the top-level ``proj_out``
    (final_layer.linear) differs from the single blocks' ``proj_out`` (linear2), whose names end in it: a PEFT
    pattern ``proj_out`` would match theirs too (diffusers then failed to load the file: wrong shapes)."""
    lora = flux_lora(seed=11)
    layers = dict(lora.layers)
    g = torch.Generator().manual_seed(12)

    def layer(out, inp, rank, alpha):
        return L.LoRALayer(torch.randn(rank, inp, generator=g) * 0.2, torch.randn(out, rank, generator=g) * 0.2,
                           alpha=alpha)

    for key, rank, alpha in (("unet.final_layer.linear", 1, 5.0), ("unet.single_blocks.0.linear2", 3, 1.5),
                             ("unet.single_blocks.1.linear2", 4, 6.0)):
        layers[key] = layer(*layers[key].delta_shape, rank, alpha)
    if text_encoder:
        clip = tiny.tiny_text_encoder("clip-l")
        for i, (key, path) in enumerate(sorted(clip_keys().items())):
            layers[key] = layer(*clip.get_submodule(path).weight.shape, 1 + i % 3, 1.0 + i % 2)
    return lora.replace(layers=layers)


def bare_pipeline(transformer, text_encoder=None):
    """A FluxPipeline holding only the transformer (and CLIP): load_lora_weights runs its own code, nothing mocked."""
    from diffusers import FluxPipeline

    return FluxPipeline(scheduler=None, vae=None, text_encoder=text_encoder, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)


def our_applied_output(lora):
    model = tiny_flux_transformer()
    host = DiffusersHost(model)
    host.apply([(L.filter_layers(lora, "unet."), 1.0, 1.0)])
    return tiny_flux_forward(model)


def clip_deltas(clip, before):
    return {k: clip.get_submodule(p).weight.detach().double() - before[k] for k, p in clip_keys().items()}


@pytest.mark.parametrize("route", ["pipeline", "mixin-calls"])
def test_diffusers_file_loads_in_diffusers_exactly(tmp_path, warnings_log, route):
    from diffusers.loaders import FluxLoraLoaderMixin

    lora = every_linear_lora()
    path = save_lora(lora, tmp_path / "flux.safetensors", "diffusers")
    model, clip = tiny_flux_transformer(), tiny.tiny_text_encoder("clip-l")
    before = state(model)
    clip_before = {k: clip.get_submodule(p).weight.detach().double() for k, p in clip_keys().items()}
    pipe = bare_pipeline(model, clip)
    if route == "pipeline":
        pipe.load_lora_weights(str(path))
    else:  # what FluxPipeline.load_lora_weights does, call by call
        sd, alphas, meta = FluxLoraLoaderMixin.lora_state_dict(str(path), return_alphas=True,
                                                               return_lora_metadata=True)
        assert not alphas and meta is not None  # ranks/alphas travel in the metadata, not as alpha tensors
        assert {k.split(".", 1)[0] for k in sd} == {"transformer", "text_encoder"}
        FluxLoraLoaderMixin.load_lora_into_transformer(sd, network_alphas=alphas, transformer=model, metadata=meta)
        FluxLoraLoaderMixin.load_lora_into_text_encoder(sd, network_alphas=alphas, text_encoder=clip,
                                                        prefix="text_encoder", metadata=meta)
    assert not complaints(warnings_log), warnings_log
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in tiny_flux_transformer().modules())
    assert sum(hasattr(m, "lora_A") for m in model.modules()) == n_linear  # every Linear got its adapter
    assert sum(hasattr(m, "lora_A") for m in clip.modules()) == len(clip_keys())

    with_adapters = tiny_flux_forward(model)  # PEFT's unfused LoRA forward = our hooks' forward
    assert (with_adapters - our_applied_output(lora)).abs().max().item() <= TOL

    pipe.fuse_lora(components=["transformer", "text_encoder"], lora_scale=1.0)
    pipe.unload_lora_weights()
    assert not any(hasattr(m, "lora_A") for m in [*model.modules(), *clip.modules()])
    assert_deltas(moved(model, before, 1.0), reference_deltas(L.filter_layers(lora, "unet.")))
    assert_deltas(clip_deltas(clip, clip_before), {k: lora[k].delta(torch.float64) for k in clip_keys()})
    assert not complaints(warnings_log), warnings_log


def test_peft_file_loads_with_set_peft_model_state_dict(tmp_path, warnings_log):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file, safe_open

    lora = every_linear_lora(text_encoder=False)
    path = save_lora(lora, tmp_path / "flux-peft.safetensors", "peft")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["lora_ops.component"] == "transformer"
    config = LoraConfig(**json.loads(meta["adapter_config"]))
    model = tiny_flux_transformer()
    before = state(model)
    peft_model = get_peft_model(model, config)
    result = set_peft_model_state_dict(peft_model, load_file(str(path)))
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    assert not complaints(warnings_log), warnings_log
    merged = peft_model.merge_and_unload()
    assert_deltas(moved(merged, before, 1.0), reference_deltas(lora))


def test_our_reader_gets_back_what_diffusers_loads(tmp_path):
    """The same file read by us: the same per-layer alphas (as PEFT matches its patterns) and the same ΔW."""
    lora = every_linear_lora()
    path = save_lora(lora, tmp_path / "flux.safetensors", "diffusers")
    back = load_lora(path)
    assert back.family == "flux1"
    for key in ("unet.final_layer.linear", "unet.single_blocks.0.linear2", "unet.single_blocks.1.linear2"):
        assert back[key].alpha == lora[key].alpha and back[key].rank == lora[key].rank, key
    model = tiny_flux_transformer()
    before = state(model)
    host = DiffusersHost(model)
    host.apply([(L.filter_layers(back, "unet."), 1.0, 1.0)])
    host.merge()
    assert_deltas(moved(model, before, 1.0), reference_deltas(L.filter_layers(lora, "unet.")))
    for key in clip_keys():
        assert back[key].alpha == lora[key].alpha, key
