"""LoRA training on the tiny SD1.5-/SDXL-shaped pipelines: exactness at step 0, determinism, cancel + resume,
learning, diffusers interop of the saved file, bad data, text-encoder LoRA, the command line."""

import json
import math
import os
import signal

import pytest
import torch
from PIL import Image

from lora_ops import lora as L
from lora_ops.errors import LoraValueError
from lora_ops.files import load_lora, save_lora
from lora_ops.testing import tiny
from lora_ops.train import Dataset, TrainConfig, Trainer, train
from lora_ops.train.data import fit_to_bucket
from lora_ops.train.diffusers_backend import DiffusersBackend

RED = (220, 30, 30)


def _red_data(n=4):
    return Dataset.from_images([Image.new("RGB", (64, 64), RED) for _ in range(n)], "a red square")


def _fixed_inputs():
    gen = torch.Generator().manual_seed(42)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([100, 700]), ["sks, a red square", "a photo"]


def _unet_out(backend, latents, timesteps, prompts):
    with torch.no_grad():
        cond = backend.encode_prompts(prompts)
        micro = torch.tensor([[64, 64, 0, 0, 64, 64]] * len(prompts), dtype=torch.float32)
        return backend.predict(backend.denoiser(), latents, timesteps, cond, micro)


def _problems(messages):
    """diffusers/PEFT warnings about keys they could not place (a UNet-only file's "no text encoder keys" is fine)."""
    return [m for m in messages if ("unexpected" in m.lower() or "missing" in m.lower())
            and not m.startswith("No LoRA keys associated")]


# ------------------------------------------------------------------------------------------------ step 0


def test_step_zero_changes_nothing_and_the_model_is_restored():
    pipe = tiny.tiny_sd1_pipeline()
    backend = DiffusersBackend(pipe)
    x, t, prompts = _fixed_inputs()
    base = _unet_out(backend, x, t, prompts)
    grads = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    config = TrainConfig(rank=4, max_steps=0, resolution=64, hash_base_model=False)
    with Trainer(config, backend, _red_data(2)) as trainer:
        assert torch.equal(trainer.predict(x, t, prompts), base)  # B = 0: exactly the base model
        lora = trainer.lora()
        assert all(torch.count_nonzero(layer.up) == 0 for layer in lora.layers.values())
        assert all(torch.count_nonzero(layer.down) > 0 for layer in lora.layers.values())  # A is gaussian
        assert sum(p.requires_grad for p in pipe.unet.parameters()) == 2 * len(lora.layers)
    assert len(lora.layers) == 4 * 2 * 16  # to_q/k/v/out.0 of attn1 and attn2 in 16 transformer blocks
    assert all(k.startswith("unet.") and k.endswith(("to_q", "to_k", "to_v", "to_out.0")) for k in lora.layers)
    assert torch.equal(_unet_out(backend, x, t, prompts), base)
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == grads
    assert not hasattr(pipe.unet, "peft_config")


# ------------------------------------------------------------------------------ determinism, cancel, resume


def _resume_config(out_dir, **over):
    base = dict(rank=4, max_steps=6, batch_size=2, gradient_accumulation_steps=2, learning_rate=2e-3,
                lr_scheduler="cosine", lr_warmup_steps=2, caption_dropout=0.3, noise_offset=0.05, min_snr_gamma=5.0,
                resolution=64, trigger_word="sks", seed=7, output_dir=str(out_dir), save_every_steps=2,
                keep_checkpoints=2, eval_every_steps=3, eval_samples=2, eval_timesteps=2, hash_base_model=False)
    return TrainConfig(**{**base, **over})


def _three_colours():
    images = [Image.new("RGB", (64, 64), c) for c in (RED, (20, 200, 40), (30, 40, 220))]
    return Dataset.from_images(images, ["red", "green, grass", "blue, sky"])


@pytest.fixture(scope="module")
def sd1_backend():
    return DiffusersBackend(tiny.tiny_sd1_pipeline())


@pytest.fixture(scope="module")
def uninterrupted(sd1_backend, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    return train(_resume_config(out), sd1_backend, _three_colours())


def test_same_seed_and_settings_give_a_bit_identical_lora(sd1_backend, uninterrupted, tmp_path):
    again = train(_resume_config(tmp_path), sd1_backend, _three_colours())
    assert L.equal(again.lora, uninterrupted.lora)
    assert again.history.loss == uninterrupted.history.loss
    other_seed = train(_resume_config(tmp_path / "s", seed=8, max_steps=1, output_dir=None), sd1_backend,
                       _three_colours())
    assert not L.equal(other_seed.lora, uninterrupted.lora, metadata=False)


def test_outputs_of_a_completed_run(uninterrupted):
    r = uninterrupted
    assert r.status == "completed" and r.step == r.total_steps == 6
    assert L.equal(load_lora(r.output), r.lora)  # kohya file, metadata included
    assert sorted(p.name for p in r.output.parent.glob("lora-checkpoints/*")) == [
        "checkpoint-000002", "checkpoint-000004"]  # periodic; the final step writes the LoRA instead
    saved = json.loads(r.history_file.read_text())
    assert saved["loss"] == r.history.loss and saved["steps"] == list(range(1, 7))
    assert saved["eval_steps"] == [0, 3, 6] and len(saved["lr"]) == 6
    assert saved["lr"][0] == 0.0 and saved["lr"][2] == pytest.approx(2e-3)  # linear warm-up, then cosine
    assert Image.open(r.plot_file).size == (800, 450)
    meta = r.lora.metadata
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4" and meta["ss_seed"] == "7"
    assert meta["ss_max_train_steps"] == "6" and meta["ss_learning_rate"] == "0.002"
    assert meta["modelspec.trigger_phrase"] == "sks"
    assert json.loads(meta["ss_tag_frequency"]) == {"1_images": {"blue": 1, "grass": 1, "green": 1, "red": 1,
                                                                 "sks": 3, "sky": 1}}


def test_cancel_by_callback_then_resume_is_bit_identical(sd1_backend, uninterrupted, tmp_path):
    seen = []
    cancelled = train(_resume_config(tmp_path), sd1_backend, _three_colours(),
                      progress=lambda step, total, loss: seen.append((step, total, loss)),
                      should_stop=lambda: len(seen) >= 3)
    assert cancelled.status == "cancelled" and cancelled.step == 3 and cancelled.output is None
    assert [s for s, _, _ in seen] == [1, 2, 3] and seen[0][1] == 6
    assert [loss for _, _, loss in seen] == uninterrupted.history.loss[:3]
    assert cancelled.checkpoint.name == "checkpoint-000003"
    assert (cancelled.checkpoint / "lora.safetensors").is_file()  # usable LoRA at the step it stopped
    resumed = train(_resume_config(tmp_path), sd1_backend, _three_colours(),
                    resume_from=tmp_path / "lora-checkpoints")  # the newest checkpoint in the folder
    assert resumed.status == "completed" and resumed.step == 6
    assert L.equal(resumed.lora, uninterrupted.lora)
    assert resumed.history.loss == uninterrupted.history.loss
    assert resumed.history.eval_loss == uninterrupted.history.eval_loss


def test_ctrl_c_stops_within_a_step_then_resume_is_bit_identical(sd1_backend, uninterrupted, tmp_path):
    def progress(step, total, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the loop finishes cleanly, no traceback

    handler = signal.getsignal(signal.SIGINT)
    cancelled = train(_resume_config(tmp_path), sd1_backend, _three_colours(), progress=progress)
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert cancelled.status == "cancelled" and cancelled.step == 2
    resumed = train(_resume_config(tmp_path), sd1_backend, _three_colours(), resume_from=cancelled.checkpoint)
    assert L.equal(resumed.lora, uninterrupted.lora)


def test_resume_refuses_other_settings(sd1_backend, uninterrupted, tmp_path):
    with pytest.raises(LoraValueError, match="rank"):
        train(_resume_config(tmp_path, rank=8), sd1_backend, _three_colours(),
              resume_from=uninterrupted.output.parent / "lora-checkpoints")


def test_existing_output_is_refused_before_training(sd1_backend, uninterrupted):
    with pytest.raises(Exception, match="already exists"):
        train(_resume_config(uninterrupted.output.parent), sd1_backend, _three_colours())


# ------------------------------------------------------------------------------------------------ learning


def _generate_latents(pipe, seeds=(0, 1, 2)):
    out = [pipe("sks, a red square", num_inference_steps=10, guidance_scale=1.0, height=64, width=64,
                generator=torch.Generator().manual_seed(s), output_type="latent").images for s in seeds]
    return torch.cat(out)  # (n, 4, 8, 8)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    pipe = tiny.tiny_sd1_pipeline()
    backend = DiffusersBackend(pipe)
    x, t, prompts = _fixed_inputs()
    base_out = _unet_out(backend, x, t, prompts)
    base_gen = _generate_latents(pipe)
    config = TrainConfig(rank=8, targets="attention+ff", learning_rate=1e-2, max_steps=40, batch_size=2,
                         resolution=64, trigger_word="sks", eval_every_steps=20, seed=1, title="red")
    with Trainer(config, backend, _red_data()) as trainer:
        result = trainer.run()
        trained_out = trainer.predict(x, t, prompts)
        trained_gen = _generate_latents(pipe)
    with torch.no_grad():
        pixels = torch.tensor(RED).float().div(127.5).sub(1).view(1, 3, 1, 1).expand(1, 3, 64, 64)
        train_latent = backend.encode_images(pixels)  # (1, 4, 8, 8)
    path = save_lora(result.lora, tmp_path_factory.mktemp("learned") / "red.safetensors", "diffusers")
    return dict(pipe=pipe, backend=backend, result=result, base_out=base_out, trained_out=trained_out,
                base_gen=base_gen, trained_gen=trained_gen, train_latent=train_latent, path=path,
                restored_out=_unet_out(backend, x, t, prompts))


def test_it_learns_the_fixed_batch_loss_drops(learned):
    evals = learned["result"].history.eval_loss  # fixed images, noise and timesteps; at steps 0, 20, 40
    assert len(evals) == 3
    drop = 1 - evals[-1] / evals[0]
    assert drop >= 0.25, evals


def test_generation_moves_toward_the_training_images(learned):
    # The tiny VAE has random weights: its decoder maps almost every latent to the same grey image, so the
    # comparison is made where the denoiser works, in latent space. Metric: "latent colour" = the spatial mean of
    # each latent channel; distance = L2 norm of the difference to the training image's latent colour, per
    # generated image (trigger prompt, DDIM 10 steps, seeds 0-2), averaged.
    target = learned["train_latent"].mean(dim=(2, 3))  # (1, 4)

    def colour_distance(latents):
        return (latents.mean(dim=(2, 3)) - target).norm(dim=1).mean().item()

    def rms_distance(latents):
        return (latents - learned["train_latent"]).pow(2).mean().sqrt().item()

    base, trained = learned["base_gen"], learned["trained_gen"]
    assert colour_distance(trained) <= 0.75 * colour_distance(base), (colour_distance(trained), colour_distance(base))
    assert rms_distance(trained) < 0.9 * rms_distance(base)


def test_model_is_the_base_model_again_after_training(learned):
    assert torch.equal(learned["restored_out"], learned["base_out"])
    assert not torch.equal(learned["trained_out"], learned["base_out"])


def test_saved_diffusers_file_loads_in_diffusers_and_reproduces_the_trained_model(learned, warnings_log):
    pipe = tiny.tiny_sd1_pipeline()  # a fresh copy of the same base model
    pipe.load_lora_weights(str(learned["path"]))
    assert not _problems(warnings_log), warnings_log
    lora = learned["result"].lora
    adapted = [n for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == len(lora.layers)  # every key used
    x, t, prompts = _fixed_inputs()
    out = _unet_out(DiffusersBackend(pipe), x, t, prompts)
    worst = (out - learned["trained_out"]).abs().max().item()
    assert worst <= 1e-5, worst


def test_saved_metadata_round_trips(learned):
    lora = learned["result"].lora
    back = load_lora(learned["path"])
    assert dict(back.metadata) == dict(lora.metadata)
    assert L.equal(back, lora)
    meta = back.metadata
    for key in ("ss_network_dim", "ss_network_alpha", "ss_learning_rate", "ss_max_train_steps", "ss_seed",
                "ss_tag_frequency", "ss_training_comment", "modelspec.trigger_phrase", "lora_ops.base_weights_sha256"):
        assert meta.get(key), key
    assert meta["ss_network_dim"] == "8" and meta["ss_max_train_steps"] == "40" and meta["modelspec.title"] == "red"
    assert len(meta["lora_ops.base_weights_sha256"]) == 64


# ------------------------------------------------------------------------------------------- data problems


def _messy_folder(root):
    good = root / "2_things"
    good.mkdir(parents=True)
    Image.new("RGB", (128, 128), RED).save(good / "square.png")
    (good / "square.txt").write_text("square")
    Image.new("RGB", (192, 64), (0, 0, 200)).save(good / "wide.png")
    (good / "wide.txt").write_text("wide")
    Image.new("RGB", (64, 64)).save(good / "nocaption.png")
    (good / "broken.png").write_bytes(b"garbage")
    (good / "broken.txt").write_text("broken")
    return root


def test_bad_files_are_reported_and_skipped_and_buckets_train(sd1_backend, tmp_path):
    data = _messy_folder(tmp_path / "data")
    config = TrainConfig(rank=2, epochs=1, batch_size=2, resolution=128, trigger_word="sks", seed=3,
                         eval_samples=2, eval_timesteps=1, hash_base_model=False)
    result = train(config, sd1_backend, data)
    # one epoch: 2 images × 2 repeats, each image its own bucket → one batch of 2 per bucket → 2 steps
    assert result.status == "completed" and result.step == result.total_steps == 2
    assert result.lora.metadata["ss_epoch"] == "1" and result.lora.metadata["ss_num_epochs"] == "1"
    skipped = {os.path.basename(p): why for p, why in result.report.skipped}
    assert skipped["nocaption.png"] == "no caption file nocaption.txt"
    assert skipped["broken.png"].startswith("unreadable image")
    assert sorted(os.path.basename(p) for p in result.report.used) == ["square.png", "wide.png"]
    assert json.loads(result.lora.metadata["ss_bucket_info"])["buckets"] == [[128, 128], [192, 64]]
    assert result.lora.metadata["ss_num_train_images"] == "4"  # 2 images × 2 repeats


def test_bad_files_stop_before_training_when_asked(sd1_backend, tmp_path):
    data = _messy_folder(tmp_path / "data")
    config = TrainConfig(rank=2, max_steps=2, resolution=128, on_bad_data="error", output_dir=str(tmp_path / "o"),
                         hash_base_model=False)
    with pytest.raises(LoraValueError, match="nocaption.png.*broken.png|broken.png.*nocaption.png"):
        train(config, sd1_backend, data)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------- SDXL + text encoders


def test_sdxl_with_text_encoder_lora_trains_and_loads_in_diffusers(tmp_path, warnings_log):
    pipe = tiny.tiny_sdxl_pipeline()
    backend = DiffusersBackend(pipe)
    assert backend.family == "sdxl"
    te_before = {n: p.detach().clone() for n, p in pipe.text_encoder_2.named_parameters()}
    x, t, prompts = _fixed_inputs()
    config = TrainConfig(rank=4, max_steps=2, batch_size=2, learning_rate=1e-2, train_text_encoder=True,
                         resolution=64, trigger_word="sks", gradient_checkpointing=True, eval_samples=1,
                         eval_timesteps=1, hash_base_model=False)
    with Trainer(config, backend, _red_data(2)) as trainer:
        result = trainer.run()
        trained_out = trainer.predict(x, t, prompts)
    parts = {k.split(".", 1)[0] for k in result.lora.layers}
    assert parts == {"unet", "te1", "te2"}
    te_layers = {k: layer for k, layer in result.lora.layers.items() if k.startswith("te")}
    assert len(te_layers) == 2 * 2 * 4  # q/k/v/out_proj of 2 layers in each of 2 encoders
    # SDXL conditions on the penultimate hidden states: te1's last layer gets no gradient (as in every trainer);
    # te2's last layer still trains through the pooled projection.
    trained = {k for k, layer in te_layers.items() if torch.count_nonzero(layer.up) > 0}
    assert trained == {k for k in te_layers if not k.startswith("te1.text_model.encoder.layers.1.")}
    assert all(torch.equal(p, te_before[n]) for n, p in pipe.text_encoder_2.named_parameters())
    assert not pipe.unet.is_gradient_checkpointing
    path = save_lora(result.lora, tmp_path / "xl.safetensors", "diffusers")
    fresh = tiny.tiny_sdxl_pipeline()
    fresh.load_lora_weights(str(path))
    assert not _problems(warnings_log), warnings_log
    out = _unet_out(DiffusersBackend(fresh), x, t, prompts)
    assert (out - trained_out).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------------- command line


def test_command_line_train(tmp_path, capsys):
    from lora_ops.train.cli import main

    data = tmp_path / "data" / "3_red"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), RED).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a red square")
    (tmp_path / "base.json").write_text(json.dumps({"rank": 2, "resolution": 64, "batch_size": 2}))
    code = main([str(tmp_path / "data"), "--tiny", "sd1", "-o", str(tmp_path / "out"), "--config",
                 str(tmp_path / "base.json"), "--max-steps", "2", "--save-format", "diffusers", "--quiet",
                 "--no-hash-base-model", "--output-name", "red"])
    assert code == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "red.safetensors" in text
    lora = load_lora(tmp_path / "out" / "red.safetensors")
    assert lora.source_format == "diffusers" and lora.metadata["ss_network_dim"] == "2"
    assert (tmp_path / "out" / "red.loss.png").is_file()


# ------------------------------------------------------------------------------------- targets, rsLoRA, bf16


def test_target_presets_and_custom_pattern(sd1_backend):
    from torch import nn

    from lora_ops.train.adapter import resolve_targets

    unet = sd1_backend.denoiser()
    keys = sd1_backend.layer_keys("unet")

    def chosen(**kw):
        return resolve_targets(TrainConfig(**kw), "unet", unet, keys)

    attention, ff, linear = chosen(), chosen(targets="attention+ff"), chosen(targets="all-linear")
    assert set(attention) < set(ff) < set(linear)
    assert len(ff) == len(attention) + 2 * 16  # ff.net.0.proj and ff.net.2 of 16 transformer blocks
    assert all(isinstance(unet.get_submodule(p), nn.Linear) for p in linear)
    assert "time_embedding.linear_1" in linear
    custom = chosen(targets="custom", target_pattern=r"attn2\.to_(k|v)$")
    assert len(custom) == 2 * 16 and all(k.endswith(("attn2.to_k", "attn2.to_v")) for k in custom.values())


def test_rslora_custom_targets_lora_value_reproduces_the_trained_model(sd1_backend):
    from lora_ops.hosts import DiffusersHost

    x, t, prompts = _fixed_inputs()
    config = TrainConfig(rank=4, alpha=2.0, rslora=True, targets="custom", target_pattern=r"attn2\.to_(k|v)$",
                         max_steps=2, batch_size=2, learning_rate=5e-2, resolution=64, eval_samples=1,
                         eval_timesteps=1, hash_base_model=False)
    with Trainer(config, sd1_backend, _red_data(2)) as trainer:
        result = trainer.run()
        trained_out = trainer.predict(x, t, prompts)
    layer = next(iter(result.lora.layers.values()))
    assert layer.scale == pytest.approx(2.0 / 4**0.5)  # alpha/√r, carried as alpha·√r / r
    assert json.loads(result.lora.metadata["ss_network_args"])["rslora"] is True
    host = DiffusersHost(sd1_backend.pipe)
    host.apply([(result.lora, 1.0, 1.0)])
    try:
        out = _unet_out(sd1_backend, x, t, prompts)
    finally:
        host.remove()
    assert (out - trained_out).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_autocast_trains_with_fp32_master_weights(sd1_backend, tmp_path, dtype):
    config = TrainConfig(rank=2, max_steps=2, batch_size=2, dtype=dtype, resolution=64, eval_samples=1,
                         eval_timesteps=1, hash_base_model=False, output_dir=str(tmp_path), save_every_steps=1)
    result = train(config, sd1_backend, _red_data(2))
    assert result.status == "completed" and all(math.isfinite(v) for v in result.history.loss)
    assert L.dtypes(result.lora) == {torch.float32}
    assert any(torch.count_nonzero(layer.up) for layer in result.lora.layers.values())
    assert result.lora.metadata["ss_mixed_precision"] == {"bfloat16": "bf16", "float16": "fp16"}[dtype]
    state = json.loads((tmp_path / "lora-checkpoints" / "checkpoint-000001" / "state.json").read_text())
    assert (state["grad_scaler"] is not None) == (dtype == "float16")
    assert next(sd1_backend.denoiser().parameters()).dtype == torch.float32  # the host's weights untouched


def test_pre_encoded_latents_and_conditioning_train_like_images(sd1_backend):
    """ComfyUI's LATENT + CONDITIONING path: the same numbers in give the bit-identical LoRA of the image path."""
    config = TrainConfig(rank=4, max_steps=3, batch_size=2, learning_rate=1e-3, resolution=64, seed=2,
                         hash_base_model=False)
    images = _three_colours()
    by_images = train(config, sd1_backend, images).lora
    pixels = torch.stack([fit_to_bucket(item.load(), (64, 64))[0] for item in images.items])  # (3, 3, 64, 64)
    with torch.no_grad():
        latents = sd1_backend.encode_images(pixels)
        conds = [{k: v[0] for k, v in sd1_backend.encode_prompts([item.caption]).items()} for item in images.items]
    encoded = Dataset.from_latents(latents, [item.caption for item in images.items], conds=conds)
    by_latents = train(config, sd1_backend, encoded).lora
    assert set(by_latents.layers) == set(by_images.layers)
    for key, layer in by_images.layers.items():
        assert torch.allclose(by_latents.layers[key].up, layer.up, rtol=0, atol=1e-6), key
    with pytest.raises(LoraValueError, match="pre-encoded"):
        train(config.replace(train_text_encoder=True), sd1_backend, encoded)
