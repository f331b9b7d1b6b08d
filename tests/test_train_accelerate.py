"""`accelerate launch --num_processes 2` on the CPU (gloo): the same loss curve as one process with the same
global batch, and every file written once, by the main process."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from lora_ops.files import load_lora
from lora_ops.testing import tiny
from lora_ops.train import TrainConfig, train
from lora_ops.train.diffusers_backend import DiffusersBackend

SETTINGS = dict(rank=4, max_steps=3, batch_size=4, learning_rate=5e-3, resolution=64, seed=3, caption_dropout=0.25,
                noise_offset=0.05, save_every_steps=2, eval_samples=2, eval_timesteps=2, hash_base_model=False,
                device="cpu", trigger_word="sks")


def _flags(settings):
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)]
    return out


@pytest.mark.slow
def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    data = tmp_path / "data" / "2_colours"
    data.mkdir(parents=True)
    for i, colour in enumerate([(220, 30, 30), (30, 200, 40), (20, 20, 220)]):
        Image.new("RGB", (64, 64), colour).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"colour {i}")
    out2 = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "lora_ops.train", str(tmp_path / "data"), "--tiny", "sd1", "-o", str(out2), "--quiet", "-v",
           *_flags(SETTINGS)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert log.count("wrote LoRA file") == 1, log[-3000:]  # one writer
    assert log.count("saved checkpoint") == 1  # at step 2, by the main process only
    assert sorted(p.name for p in out2.iterdir()) == ["lora-checkpoints", "lora.loss.json", "lora.loss.png",
                                                       "lora.safetensors"]
    assert [p.name for p in (out2 / "lora-checkpoints").iterdir()] == ["checkpoint-000002"]
    two = json.loads((out2 / "lora.loss.json").read_text())

    one = train(TrainConfig(**SETTINGS), DiffusersBackend(tiny.tiny_sd1_pipeline()), tmp_path / "data")
    assert one.history.steps == two["steps"] == [1, 2, 3]
    assert two["loss"] == pytest.approx(one.history.loss, rel=1e-5, abs=1e-6)
    assert two["eval_loss"] == pytest.approx(one.history.eval_loss, rel=1e-5, abs=1e-6)
    lora2 = load_lora(out2 / "lora.safetensors")
    assert lora2.metadata["ss_num_processes"] == "2" and lora2.metadata["ss_batch_size_per_device"] == "2"
    # Adam divides by √v: where a gradient is ~0, float noise in the all-reduce order moves the update a little,
    # so the weights agree to a fraction of their size rather than to 1e-6.
    worst = max((lora2[k].up - layer.up).abs().max().item() for k, layer in one.lora.layers.items())
    largest = max(layer.up.abs().max().item() for layer in one.lora.layers.values())
    assert largest > 0 and worst <= 0.01 * largest, (worst, largest)
