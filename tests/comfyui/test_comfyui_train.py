"""Train LoRA (LoRA Ops) inside real ComfyUI (in-process, CPU) on the tiny SD 1.5-layout MODEL from LATENT +
CONDITIONING, run the way ComfyUI runs nodes (under ``torch.inference_mode()``, with its progress-bar hook).

Checked against ComfyUI 0.3.64. What is asserted:
- the noise schedule read from ComfyUI's ``model_sampling`` (ε, v via its ModelSamplingDiscrete node, flow via
  ModelSamplingSD3) is ComfyUI's own math: for a prediction equal to our regression target, ComfyUI's
  ``calculate_denoised`` gives back x₀, and our x_t equals its ``calculate_input(σ, noise_scaling(σ, ε, x₀))``;
- a run advances the UI progress bar step by step, lowers the fixed-batch evaluation loss, leaves the input MODEL's
  output unchanged, and its LORA applies with 100% coverage; the returned MODEL has it applied;
- the backend's prediction is ComfyUI's: turned into x₀ by ``calculate_denoised`` it equals ComfyUI's own
  ``apply_model`` (SD 1.5 with context; SDXL with context + the ``y`` vector from pooled output and sizes);
- SDXL (a tiny SDXL-layout UNet with SDXL's real 2816-wide ``y``) trains from CONDITIONING with pooled output;
- an interrupt raised during step k stops the run after step k with a checkpoint; resuming gives the
  bit-identical LoRA of an uninterrupted run.
"""

import importlib
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import import_pack

from lora_ops import keymap
from lora_ops.testing import tiny

pack = import_pack()
ours = pack.nodes
train_node = importlib.import_module(f"{pack.__name__}.nodes.train_node")
comfy_train = importlib.import_module(f"{pack.__name__}.nodes.comfy_train")
comfy_env = importlib.import_module(f"{pack.__name__}.nodes.comfy_env")
comfy_host = importlib.import_module(f"{pack.__name__}.nodes.comfy_host")
LoraValueError = pack.lora_ops.errors.LoraValueError

SETTINGS = dict(rank=4, alpha=0.0, learning_rate=1e-2, batch_size=2, seed=3, targets="attention",
                lr_scheduler="constant", warmup_steps=0)


@pytest.fixture
def output(comfy, tmp_path, monkeypatch):
    monkeypatch.setattr(comfy.folder_paths, "output_directory", str(tmp_path))
    return tmp_path


@pytest.fixture
def graph_inputs(comfy, build):
    """MODEL, LATENT and CONDITIONING made the way a graph makes them: under inference mode."""
    with torch.inference_mode():
        model = build.model()
        clip = build.clip()
        positive = comfy.nodes.CLIPTextEncode().encode(clip, "sks, a red square")[0]
        gen = torch.Generator().manual_seed(0)
        samples = torch.zeros(4, 4, 8, 8)
        samples[:, :, 2:6, 2:6] = 3.0  # a distinctive pattern to learn
        samples += 0.1 * torch.randn(samples.shape, generator=gen)
    return model, {"samples": samples}, positive


def predict_base(model, x, t, context):
    with torch.no_grad():
        return model.model.diffusion_model(x, t, context=context, transformer_options={})


@pytest.fixture
def progress_hook(comfy):
    calls = []
    utils = comfy.comfy.utils
    saved = utils.PROGRESS_BAR_HOOK
    utils.set_progress_bar_global_hook(lambda value, total, preview=None, *a, **k: calls.append((value, total)))
    yield calls
    utils.set_progress_bar_global_hook(saved)


def run_train(graph_inputs, steps, **extra):
    model, latents, positive = graph_inputs
    settings = {**SETTINGS, **{k: extra.pop(k) for k in list(extra) if k in SETTINGS}}
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return train_node.LoraOpsTrain().train(model, steps, **settings, run_name=extra.pop("run_name", "t"),
                                               resume=extra.pop("resume", False), latents=latents,
                                               positive=positive, unique_id="7", **extra)


@pytest.mark.parametrize("sampling", ["eps", "v_prediction", "flow"])
def test_schedule_is_comfyuis_math(comfy, build, sampling):
    adv = importlib.import_module("comfy_extras.nodes_model_advanced")
    model = build.model()
    if sampling == "v_prediction":
        model = adv.ModelSamplingDiscrete().patch(model, "v_prediction", False)[0]
    elif sampling == "flow":
        model = adv.ModelSamplingSD3().patch(model, 3.0)[0]
    ms = model.get_model_object("model_sampling")
    schedule = comfy_train.noise_schedule_of(ms)
    assert schedule.prediction_type == {"eps": "epsilon"}.get(sampling, sampling)
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 4, 8, 8, generator=gen), torch.randn(6, 4, 8, 8, generator=gen)
    t = schedule.sample_timesteps(6, gen)
    noisy, target = schedule.noisy_and_target(x0, eps, t)
    if sampling == "flow":
        sigma = t / ms.multiplier  # the model timestep is σ·multiplier (ComfyUI's ``timestep``)
        # σ is drawn with ComfyUI's time shift: at evenly spaced u, our evaluation σ equal its ``sigma(u·mult)``
        u = (torch.arange(4) + 0.5) / 4
        assert torch.allclose(schedule.eval_timesteps(4) / ms.multiplier, ms.sigma(u * ms.multiplier), atol=1e-6)
    else:
        sigma = ms.sigmas[t.long()]  # ComfyUI's σ for our integer timestep
    x = ms.noise_scaling(sigma.reshape(-1, 1, 1, 1), eps, x0)
    assert torch.allclose(ms.calculate_input(sigma.reshape(-1, 1, 1, 1), x), noisy, atol=1e-5)
    denoised = ms.calculate_denoised(sigma, target, x)
    assert torch.allclose(denoised, x0, atol=1e-4), (denoised - x0).abs().max()


def test_unsupported_sampling_is_refused(comfy, build):
    adv = importlib.import_module("comfy_extras.nodes_model_advanced")
    model = adv.ModelSamplingDiscrete().patch(build.model(), "x0", False)[0]
    with pytest.raises(LoraValueError, match="not plain"):
        comfy_train.noise_schedule_of(model.get_model_object("model_sampling"))


def test_train_in_graph_learns_and_applies(comfy, graph_inputs, output, progress_hook):
    model, latents, positive = graph_inputs
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    t, ctx = torch.tensor([500.0]), positive[0][0]
    before = predict_base(model, x, t, ctx)
    lora, new_model, plot, report = run_train(graph_inputs, 30)
    values = [v for v, _ in progress_hook]
    assert {n for _, n in progress_hook} == {30} and values[0] == 1 and values[-1] == 30
    if hasattr(comfy.comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL"):  # newer ComfyUI throttles what reaches the hook
        assert values == sorted(set(values))
    else:
        assert values == list(range(1, 31))  # every step reported (0.3.64 passes every update on)
    # every attention projection of the tiny UNet got a layer, and it applies fully
    cov = comfy_host.apply_loras(model, None, [(lora, 1.0, 1.0)])[2]
    assert len(lora.layers) == len(cov.matched) and not cov.unmatched and len(lora.layers) > 0
    assert all(k.endswith(("to_q", "to_k", "to_v", "to_out.0")) for k in lora.layers)
    # the input MODEL is untouched; the output MODEL is patched (same as applying the LoRA ourselves)
    assert torch.equal(predict_base(model, x, t, ctx), before)
    assert len(new_model.patches) == len(lora.layers) and not model.patches
    # it learned: fixed-batch evaluation loss dropped; files and metadata are there
    run = output / "loras" / "t_00001"
    history = json.loads((run / "t.loss.json").read_text())
    assert history["status"] == "completed" and history["step"] == 30
    assert history["eval_loss"][-1] < 0.9 * history["eval_loss"][0], history["eval_loss"]
    saved = pack.lora_ops.files.load_lora(run / "t.safetensors")
    assert saved.metadata["ss_network_dim"] == "4" and saved.metadata["ss_max_train_steps"] == "30"
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and "30/30 steps" in report


def test_interrupt_stops_within_one_step_and_resume_is_exact(comfy, graph_inputs, output, progress_hook):
    full = run_train(graph_inputs, 8, run_name="full")[0]
    mm = comfy.comfy.model_management
    utils = comfy.comfy.utils

    def hook(value, total, preview=None, *a, **k):
        if value == 3:
            mm.interrupt_current_processing(True)  # the user presses Cancel during step 3's report

    utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run_train(graph_inputs, 8, run_name="cut")
    finally:
        mm.interrupt_current_processing(False)
    checkpoints = sorted(p.name for p in (output / "loras" / "cut_00001" / "cut-checkpoints").iterdir())
    assert checkpoints == ["checkpoint-000003"]
    utils.set_progress_bar_global_hook(lambda *a, **k: None)
    resumed = run_train(graph_inputs, 8, run_name="cut", resume=True)[0]
    assert set(resumed.layers) == set(full.layers)
    for key in full.layers:
        assert torch.equal(resumed.layers[key].down, full.layers[key].down), key
        assert torch.equal(resumed.layers[key].up, full.layers[key].up), key


def test_bad_inputs_are_named(comfy, graph_inputs, output):
    model, latents, positive = graph_inputs
    node = train_node.LoraOpsTrain()
    with pytest.raises(LoraValueError, match="exactly one of"):
        node.train(model, 2, **SETTINGS, run_name="x", resume=False, positive=positive)
    with pytest.raises(LoraValueError, match="need their conditioning"):
        node.train(model, 2, **SETTINGS, run_name="x", resume=False, latents=latents)
    with pytest.raises(LoraValueError, match="CLIP"):
        node.train(model, 2, **SETTINGS, run_name="x", resume=False, latents=latents, positive=positive,
                   caption_dropout=0.5)
    with pytest.raises(LoraValueError, match="no earlier run"):
        node.train(model, 2, **SETTINGS, run_name="never", resume=True, latents=latents, positive=positive)
    assert "plain name" in train_node.LoraOpsTrain.VALIDATE_INPUTS(run_name="../../x")
    assert not (output / "loras").exists() or not any((output / "loras").rglob("*.safetensors"))


def test_train_on_a_flow_matching_model(comfy, graph_inputs, output):
    """The same tiny UNet switched to rectified flow by ComfyUI's ModelSamplingSD3 node trains on the flow target."""
    adv = importlib.import_module("comfy_extras.nodes_model_advanced")
    model, latents, positive = graph_inputs
    with torch.inference_mode():
        flow = adv.ModelSamplingSD3().patch(model, 3.0)[0]
    lora = run_train((flow, latents, positive), 3, run_name="flow")[0]
    history = json.loads((output / "loras" / "flow_00001" / "flow.loss.json").read_text())
    assert history["step"] == 3 and all(torch.isfinite(torch.tensor(history["loss"])))
    assert lora.metadata["modelspec.prediction_type"] == "flow"


@pytest.fixture
def sdxl_model(comfy):
    """ComfyUI's SDXL model class around a tiny SDXL-layout UNet whose ``y`` input has SDXL's real width (2816:
    pooled 1280 + 6 × 256 from ComfyUI's fixed timestep embedder), built under inference mode like a loader."""
    c = comfy.comfy
    config = {**tiny.UNET_CONFIGS["sdxl"], "addition_time_embed_dim": 256,
              "projection_class_embeddings_input_dim": 2816}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**config)
    sd = {}
    for name, tensor in unet.state_dict().items():
        module, leaf = name.rsplit(".", 1)
        sd[f"{keymap.unet_diffusers_to_ldm(module, 'sdxl')}.{leaf}"] = tensor.detach().clone()
    with torch.inference_mode():
        model_config = c.supported_models.SDXL(c.model_detection.detect_unet_config(sd, ""))
        model_config.set_inference_dtype(torch.float32, None)
        base = model_config.get_model(sd, "")
        base.load_model_weights(sd, "")
        mm = c.model_management
        return c.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def sdxl_conditioning(n=1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, 77, 2 * tiny.TEXT_HIDDEN, generator=gen), {"pooled_output": torch.randn(n, 1280,
                                                                                                  generator=gen)}]]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_prediction_is_comfyuis_apply_model(comfy, build, sdxl_model, graph_inputs, family):
    model = sdxl_model if family == "sdxl" else graph_inputs[0]
    positive = sdxl_conditioning(2) if family == "sdxl" else graph_inputs[2] * 2
    backend = comfy_train.ComfyBackend(model)
    backend.load()
    rows = backend.conditioning(positive)
    cond = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    micro = torch.tensor([[64.0, 64, 0, 0, 64, 64], [80, 48, 8, 0, 64, 64]])
    schedule = backend.noise_schedule()
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([100, 700])
    noisy, _ = schedule.noisy_and_target(x0, eps, t)
    ms = model.get_model_object("model_sampling")
    sigma = ms.sigmas[t]
    x = x0 + sigma.reshape(-1, 1, 1, 1) * eps
    with torch.no_grad():
        ours = ms.calculate_denoised(sigma, backend.predict(backend.denoiser(), noisy, t, cond, micro), x)
        extra = {}
        if family == "sdxl":
            extra["y"] = torch.cat([model.model.encode_adm(pooled_output=p[None], width=m[1], height=m[0],
                                                           crop_w=m[3], crop_h=m[2], target_width=m[5],
                                                           target_height=m[4]) for p, m in
                                    zip(cond["pooled"], micro.tolist())])
        theirs = model.model.apply_model(x, sigma, c_crossattn=cond["context"], **extra)
    # fp32 rounding only: x_t is formed as √ᾱ·x₀ + √(1-ᾱ)·ε here and as (x₀ + σε)/√(1+σ²) there (seen: 4e-6)
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 2e-5


def test_train_sdxl_from_conditioning(comfy, sdxl_model, output):
    gen = torch.Generator().manual_seed(0)
    samples = torch.zeros(2, 4, 8, 8)
    samples[:, :, 2:6, 2:6] = 6.0  # SDXL scales latents by 0.13025 (SD 1.5: 0.18215)
    samples += 0.1 * torch.randn(samples.shape, generator=gen)
    lora = run_train((sdxl_model, {"samples": samples}, sdxl_conditioning()), 60, run_name="xl",
                     targets="attention+ff")[0]
    history = json.loads((output / "loras" / "xl_00001" / "xl.loss.json").read_text())
    # the random tiny SDXL learns slower than the SD 1.5 one (seen: -6% at 40 steps, -10% at 100)
    assert history["eval_loss"][-1] < 0.95 * history["eval_loss"][0], history["eval_loss"]
    assert lora.family == "sdxl" and lora.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    cov = comfy_host.apply_loras(sdxl_model, None, [(lora, 1.0, 1.0)])[2]
    assert len(cov.matched) == len(lora.layers) > 0 and not cov.unmatched
    with pytest.raises(LoraValueError, match="pooled_output"):
        run_train((sdxl_model, {"samples": samples}, [[torch.zeros(1, 77, 64), {}]]), 1, run_name="xl")


def test_gradient_checkpointing_gives_the_same_lora(comfy, graph_inputs, output, monkeypatch):
    plain = run_train(graph_inputs, 3, run_name="plain")[0]
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    checkpointed = run_train(graph_inputs, 3, run_name="ckpt", gradient_checkpointing=True)[0]
    assert len(calls) >= 3 * len(comfy_train.ComfyBackend(graph_inputs[0])._blocks())  # every block, every step
    for key, layer in plain.layers.items():
        assert torch.allclose(checkpointed.layers[key].up, layer.up, rtol=0, atol=1e-7), key
    backend = comfy_train.ComfyBackend(graph_inputs[0])
    assert backend._blocks() and not any("forward" in vars(b) for b in backend._blocks())  # unwrapped again


class PoolingVAE:
    """A stand-in for ComfyUI's VAE (its real SD VAE has a fixed 128-channel width, ~80 M parameters): ``encode``
    takes an IMAGE (B, H, W, 3) in [0, 1] like ComfyUI's and returns raw 4-channel latents at 1/8 size."""

    def encode(self, images):
        pixels = images.permute(0, 3, 1, 2) * 2 - 1  # (B, 3, H, W)
        pooled = torch.nn.functional.avg_pool2d(pixels, 8)  # (B, 3, H/8, W/8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1) * 5  # (B, 4, H/8, W/8)


def test_train_from_images_and_conditioning(comfy, graph_inputs, output):
    """What ComfyUI's "Load Image and Text Dataset from Folder" node gives: IMAGE + one CONDITIONING per image."""
    model, _, positive = graph_inputs
    images = torch.full((3, 64, 64, 3), 0.5)
    images[:, 16:48, 16:48] = torch.tensor([0.9, 0.1, 0.1])
    per_image = positive * 3
    with torch.inference_mode():
        lora = train_node.LoraOpsTrain().train(model, 2, **SETTINGS, run_name="img", resume=False, images=images,
                                               positive=per_image, vae=PoolingVAE(), captions="a\nb\nc")[0]
    assert lora.metadata["ss_num_train_images"] == "3"
    with torch.inference_mode(), pytest.raises(LoraValueError, match="needs a VAE"):
        train_node.LoraOpsTrain().train(model, 1, **SETTINGS, run_name="img", resume=False, images=images,
                                        positive=per_image)


def test_train_from_images_and_captions_with_comfyuis_clip(comfy, build, graph_inputs, output):
    """Captions encoded by ComfyUI's own CLIP (tokenize + encode_from_tokens), caption dropout included."""
    model = graph_inputs[0]
    images = torch.full((2, 64, 64, 3), 0.5)
    with torch.inference_mode():
        clip = build.clip()
        lora = train_node.LoraOpsTrain().train(model, 2, **SETTINGS, run_name="cap", resume=False, images=images,
                                               captions="a red square\na blue square", vae=PoolingVAE(), clip=clip,
                                               caption_dropout=0.5, trigger_word="sks", resolution=64)[0]
    assert json.loads(lora.metadata["ss_tag_frequency"]) == {"1_images": {"sks": 2, "a red square": 1,
                                                                          "a blue square": 1}}


def test_half_precision_model_trains_in_float32_on_the_cpu(comfy, unet_sd, graph_inputs, output):
    """A float16 MODEL (as ComfyUI loads one on a GPU) trains with float32 LoRA weights; on the CPU a mismatched
    autocast dtype is refused with the reason instead of failing inside a group norm."""
    c = comfy.comfy
    sd = dict(unet_sd)
    config = c.supported_models.SD15(c.model_detection.detect_unet_config(sd, ""))
    config.set_inference_dtype(torch.float16, None)
    with torch.inference_mode():
        base = config.get_model(sd, "")
        base.load_model_weights(sd, "")
        mm = c.model_management
        half = c.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                           offload_device=mm.unet_offload_device())
    _, latents, positive = graph_inputs
    lora = run_train((half, latents, positive), 2, run_name="half")[0]
    assert all(layer.up.dtype == torch.float32 for layer in lora.layers.values())
    with pytest.raises(LoraValueError, match="training_dtype to float32"):
        run_train((half, latents, positive), 1, run_name="half", training_dtype="bfloat16")
