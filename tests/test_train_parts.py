"""Training building blocks without a model: data folders, buckets, batches, schedules, settings, checkpoints, plot."""

import json
import math

import pytest
import torch
from PIL import Image

from lora_ops.errors import LoraValueError
from lora_ops.train import TrainConfig
from lora_ops.train import checkpoint as ckpt
from lora_ops.train.data import (
    Dataset,
    epoch_batches,
    fit_to_bucket,
    load_pixels,
    make_buckets,
    pick_bucket,
    scan_folder,
    tag_frequency,
    with_trigger,
)
from lora_ops.train.schedule import NoiseSchedule, lr_lambda


def _image(path, size=(64, 64), color=(200, 20, 20)):
    Image.new("RGB", size, color).save(path)


def test_scan_folder_kohya_layout_and_report(tmp_path):
    (tmp_path / "10_sks dog").mkdir()
    (tmp_path / "notes").mkdir()
    _image(tmp_path / "10_sks dog" / "a.png")
    (tmp_path / "10_sks dog" / "a.txt").write_text("a dog, sitting\nsecond line ignored\n")
    _image(tmp_path / "10_sks dog" / "b.jpg")  # no caption
    _image(tmp_path / "top.png")
    (tmp_path / "top.txt").write_text("")  # empty caption is a caption
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    (tmp_path / "broken.txt").write_text("x")
    _image(tmp_path / "notes" / "c.png")

    data = scan_folder(tmp_path)
    by_name = {item.source.rsplit("/", 1)[-1]: item for item in data.items}
    assert sorted(by_name) == ["a.png", "broken.png", "top.png"]
    assert by_name["a.png"].caption == "a dog, sitting" and by_name["a.png"].repeats == 10
    assert by_name["a.png"].folder == "10_sks dog"
    assert by_name["top.png"].caption == "" and by_name["top.png"].repeats == 1
    assert [(p.rsplit("/", 1)[-1], why) for p, why in data.report.skipped] == [("b.jpg", "no caption file b.txt")]
    assert data.report.ignored_folders == ["notes"]

    loaded = load_pixels(data.items, [(64, 64)], data.report)  # decoding finds the broken file, no exception
    assert len(loaded) == 2
    assert any("broken.png" in p and "unreadable image" in why for p, why in data.report.skipped)
    assert "2 images used, 2 left out" in data.report.summary()


def test_folder_named_with_repeats_and_missing_folder(tmp_path):
    folder = tmp_path / "3_style"
    folder.mkdir()
    _image(folder / "x.png")
    (folder / "x.txt").write_text("style")
    assert scan_folder(folder).items[0].repeats == 3
    with pytest.raises(LoraValueError, match="not found"):
        scan_folder(tmp_path / "nope")


def test_in_memory_images_from_pil_and_comfy_tensor():
    pil = Dataset.from_images([Image.new("RGB", (8, 8))] * 2, ["a", "b"])
    assert [i.caption for i in pil.items] == ["a", "b"]
    t = torch.rand(3, 16, 24, 3)  # ComfyUI IMAGE: (B, H, W, C) in [0, 1]
    data = Dataset.from_images(t, "one caption")
    assert len(data.items) == 3 and data.items[2].load().size == (24, 16)
    with pytest.raises(LoraValueError, match="3 images but 2 captions"):
        Dataset.from_images(t, ["a", "b"])


def test_trigger_word_and_tag_frequency():
    assert with_trigger("a dog", "sks") == "sks, a dog"
    assert with_trigger("", "sks") == "sks"
    assert with_trigger("sks, a dog", "sks") == "sks, a dog"
    assert with_trigger("a dog", "") == "a dog"
    items = Dataset.from_images([Image.new("RGB", (8, 8))] * 2, ["x", "y"], name="set").items
    freq = tag_frequency(items, ["sks, red", "sks, blue"])
    assert freq == {"1_set": {"blue": 1, "red": 1, "sks": 2}}


def test_buckets_keep_area_and_aspect():
    buckets = make_buckets(512, 64, 256, 1024)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert pick_bucket((1000, 1000), buckets) == (512, 512)
    wide = pick_bucket((1920, 1080), buckets)
    assert wide[0] > wide[1] and abs(math.log(wide[0] / wide[1]) - math.log(1920 / 1080)) < 0.15


def test_fit_to_bucket_covers_then_centre_crops():
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 50, 100))  # blue strip on the left edge: cropped away
    pixels, (top, left) = fit_to_bucket(img, (128, 64))
    assert pixels.shape == (3, 64, 128) and (top, left) == (0, 32)
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.allclose(pixels[:, 32, 10], torch.tensor([1.0, -1.0, -1.0]), atol=0.02)  # red, blue strip gone


def test_epoch_batches_deterministic_full_and_bucket_pure():
    buckets = [0, 0, 0, 1, 1, 0, 1]
    repeats = [1, 2, 1, 1, 3, 1, 1]
    a = epoch_batches(buckets, repeats, 3, seed=5, epoch=0)
    assert a == epoch_batches(buckets, repeats, 3, seed=5, epoch=0)
    assert a != epoch_batches(buckets, repeats, 3, seed=5, epoch=1)
    assert all(len(b) == 3 and len({buckets[i] for i in b}) == 1 for b in a)
    counts = {i: sum(b.count(i) for b in a) for i in range(len(buckets))}
    assert all(counts[i] >= repeats[i] for i in counts)  # every repeat shown; short batches filled up
    assert len(a) == math.ceil(5 / 3) + math.ceil(5 / 3)


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear"])
def test_lr_schedules_match_diffusers(kind):
    from diffusers.optimization import get_scheduler

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    name = {"constant": "constant_with_warmup"}.get(kind, kind)
    ref = get_scheduler(name, opt, num_warmup_steps=3, num_training_steps=10)
    ours = lr_lambda(kind, 3, 10)
    for step in range(12):
        assert ours(step) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        ref.step()


def _ddpm():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_noise_math_matches_diffusers(prediction):
    ref = _ddpm()
    sched = NoiseSchedule(prediction, 1000, ref.alphas_cumprod.clone())
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 500, 999])
    noisy, target = sched.noisy_and_target(x0, eps, t)
    assert torch.allclose(noisy, ref.add_noise(x0, eps, t), atol=1e-6)
    expected = eps if prediction == "epsilon" else ref.get_velocity(x0, eps, t)
    assert torch.allclose(target, expected, atol=1e-6)
    # min-SNR-γ as in diffusers' train_text_to_image_lora.py (compute_snr, then min(snr, γ)/snr or /(snr+1))
    ac = ref.alphas_cumprod[t]
    snr = ac / (1 - ac)
    w = torch.stack([snr, 5.0 * torch.ones_like(snr)], 1).min(1)[0]
    w = w / snr if prediction == "epsilon" else w / (snr + 1)
    assert torch.allclose(sched.min_snr_weights(t, 5.0, torch.device("cpu")), w)


def test_flow_matching_math():
    sched = NoiseSchedule("flow", 1000)
    x0, eps = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    noisy, target = sched.noisy_and_target(x0, eps, torch.tensor([250.0, 1000.0]))
    assert torch.allclose(noisy[0], torch.full((1, 2, 2), 0.75)) and torch.allclose(noisy[1], torch.zeros(1, 2, 2))
    assert torch.equal(target, -x0)
    with pytest.raises(LoraValueError, match="flow"):
        sched.min_snr_weights(torch.tensor([1]), 5.0, torch.device("cpu"))
    with pytest.raises(LoraValueError, match="not supported"):
        NoiseSchedule("sample", 1000, torch.ones(1000))


def test_config_defaults_validation_and_json(tmp_path):
    c = TrainConfig()
    assert (c.rank, c.network_alpha, c.targets, c.learning_rate) == (16, 16.0, "attention", 1e-4)
    assert TrainConfig(rank=16, alpha=8, rslora=True).effective_alpha == pytest.approx(8 * 4)
    path = tmp_path / "c.json"
    path.write_text(TrainConfig(rank=4, lr_scheduler="cosine").to_json())
    assert TrainConfig.from_json(path) == TrainConfig(rank=4, lr_scheduler="cosine")
    for bad, match in [
        (dict(rank=0), "rank"),
        (dict(targets="custom"), "target_pattern"),
        (dict(targets="custom", target_pattern="("), "regex"),
        (dict(lr_scheduler="exp"), "lr_scheduler"),
        (dict(resolution=100), "multiple"),
        (dict(output_name="../x"), "plain file name"),
    ]:
        with pytest.raises(LoraValueError, match=match):
            TrainConfig(**bad)
    with pytest.raises(LoraValueError, match="unknown training setting"):
        TrainConfig.from_dict({"rnak": 4})


def test_checkpoint_round_trips_optimizer_and_rng_exactly(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(2))]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.8, 0.95))
    for _ in range(3):
        sum((p**2).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
    torch.manual_seed(123)
    folder = ckpt.save_checkpoint(tmp_path / "run" / "checkpoint-000003", step=3,
                                  adapter={"unet/x/A": params[0].detach().clone()},
                                  optimizer=opt.state_dict(), info={"note": 0.1 + 0.2})
    expected_next = torch.rand(4)
    torch.manual_seed(999)
    state = ckpt.load_checkpoint(tmp_path / "run")  # the folder of checkpoints: newest one
    assert state.path == folder and state.step == 3 and state.info["note"] == 0.1 + 0.2
    assert torch.equal(state.adapter["unet/x/A"], params[0])
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3)
    fresh.load_state_dict(state.optimizer)
    for a, b in zip(opt.state.values(), fresh.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert fresh.param_groups[0]["betas"] == (0.8, 0.95)
    ckpt.restore_rng(state.rng["tensors"], state.rng["info"])
    assert torch.equal(torch.rand(4), expected_next)
    assert not list((tmp_path / "run").glob(".*"))  # no temp folders left behind
    meta = json.loads((folder / "state.json").read_text())
    assert meta["format"] == ckpt.FORMAT


def test_prune_keeps_newest(tmp_path):
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path / ckpt.checkpoint_name(step), step=step, adapter={},
                             optimizer={"state": {}, "param_groups": []}, info={})
    ckpt.prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000004", "checkpoint-000006"]


def test_loss_plot_image(tmp_path):
    from lora_ops.plots_train import loss_plot

    history = {"steps": [1, 2, 3], "loss": [1.0, 0.8, 0.9], "lr": [1e-4] * 3, "eval_steps": [0, 3],
               "eval_loss": [1.0, 0.7]}
    image = loss_plot(history, tmp_path / "loss.png", title="t")
    assert image.mode == "RGB" and image.size == (800, 450)
    assert Image.open(tmp_path / "loss.png").size == (800, 450)
    assert loss_plot({}).size == (800, 450)  # nothing trained yet still draws


def test_flow_shift_moves_timesteps_toward_noise():
    plain, shifted = NoiseSchedule("flow", 1000), NoiseSchedule("flow", 1000, flow_shift=3.0)
    u = (torch.arange(4) + 0.5) / 4
    assert torch.allclose(plain.eval_timesteps(4), u * 1000)
    assert torch.allclose(shifted.eval_timesteps(4), 3 * u / (1 + 2 * u) * 1000)  # SD3's time shift
    draws = shifted.sample_timesteps(1000, torch.Generator().manual_seed(0))
    assert 0 <= float(draws.min()) and float(draws.max()) <= 1000 and float(draws.mean()) > 600  # plain: ~500
    with pytest.raises(LoraValueError, match="positive"):
        NoiseSchedule("flow", 1000, flow_shift=0.0)


def test_pre_encoded_data_is_checked():
    latents = torch.zeros(3, 4, 8, 8)
    assert [i.caption for i in Dataset.from_latents(latents, "a").items] == ["a"] * 3
    with pytest.raises(LoraValueError, match="3 latents but 2 captions"):
        Dataset.from_latents(latents, ["a", "b"])
    with pytest.raises(LoraValueError, match="3 latents but 2 conditionings"):
        Dataset.from_latents(latents, "a", conds=[{"c": torch.zeros(1)}] * 2)
    with pytest.raises(LoraValueError, match=r"\(N, C, h, w\)"):
        Dataset.from_latents(torch.zeros(4, 8, 8))
