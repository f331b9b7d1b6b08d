"""LoRA training: our loop (`lora_ops.train.train`) against the plain diffusers recipe, side by side.

    python benchmarks/train.py [--steps 40] [--batch 4] [--rank 16] [--resolution 64] [--repeats 3]

Both train the same tiny SD1.5-shaped pipeline (`lora_ops.testing.tiny`, random weights) on the same 8 synthetic
64×64 captioned images (coloured stripes), at the same batch size, rank, learning rate and number of steps, with
one torch thread, fp32, on the CPU. Each run is a fresh process, so peak RSS (``ru_maxrss``) is that side's alone
(imports included); the sides alternate and each is run ``--repeats`` times; the table shows the best steps/s and
the lowest peak RSS of each side.

The reference is diffusers' ``examples/text_to_image/train_text_to_image_lora.py`` training step, written out:
frozen VAE / text encoder / UNet, ``unet.add_adapter(LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian",
target_modules=["to_k", "to_q", "to_v", "to_out.0"]))``, AdamW over the LoRA parameters, ``get_scheduler("constant")``,
``accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)``, and per step: VAE encode (latent_dist.sample() ×
scaling_factor), randn noise, random timesteps, ``add_noise``, text encoder, UNet, MSE, ``accelerator.backward``,
``clip_grad_norm_``, optimizer / scheduler step. Its image transforms (Resize, CenterCrop, ToTensor, Normalize) are
written with PIL + torch because torchvision is not installed here; images are already 64×64, so they are the
identity resize plus normalisation either way.

Steps/s counts optimizer steps after the first 2 (warm-up), timed from step callbacks; "end to end" is the whole
call, set-up included (for us: decoding, caching latents and caption embeddings, the step-0 and final evaluation).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WARMUP = 2
COLOURS = [(220, 30, 30), (30, 200, 40), (20, 20, 220), (230, 200, 20)]


def _images(resolution: int):
    """8 captioned images: horizontal or vertical stripes of one of 4 colours on white."""
    from PIL import Image, ImageDraw

    out = []
    for i in range(8):
        colour, vertical = COLOURS[i % 4], i >= 4
        img = Image.new("RGB", (resolution, resolution), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        for k in range(0, resolution, 8):
            box = (k, 0, k + 3, resolution) if vertical else (0, k, resolution, k + 3)
            draw.rectangle(box, fill=colour)
        out.append((img, f"{'vertical' if vertical else 'horizontal'} stripes, colour {i % 4}"))
    return out


def run_ours(args: argparse.Namespace) -> dict:
    import torch

    from lora_ops.testing import tiny
    from lora_ops.train import Dataset, TrainConfig, train
    from lora_ops.train.diffusers_backend import DiffusersBackend

    torch.set_num_threads(1)
    images = _images(args.resolution)
    pipe = tiny.tiny_sd1_pipeline()
    config = TrainConfig(rank=args.rank, max_steps=args.steps, batch_size=args.batch, learning_rate=1e-4,
                         resolution=args.resolution, seed=0, hash_base_model=False)
    stamps: list[float] = []
    start = time.perf_counter()
    result = train(config, DiffusersBackend(pipe), Dataset.from_images([i for i, _ in images], [c for _, c in images]),
                   progress=lambda step, total, loss: stamps.append(time.perf_counter()))
    end = time.perf_counter()
    return {"stamps": stamps, "total": end - start, "loss": result.history.loss[-1]}


def run_reference(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from peft import LoraConfig

    from lora_ops.testing import tiny

    torch.set_num_threads(1)
    images = _images(args.resolution)
    pipe = tiny.tiny_sd1_pipeline()
    stamps: list[float] = []
    start = time.perf_counter()
    torch.manual_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet_lora_config = LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    unet.add_adapter(unet_lora_config)
    lora_layers = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-08)

    def transform(img):  # Resize, CenterCrop (identity here), ToTensor, Normalize([0.5], [0.5])
        t = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
        t = t.reshape(img.height, img.width, 3).permute(2, 0, 1).float() / 255.0
        return (t - 0.5) / 0.5

    def tokenize(captions):
        return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                         return_tensors="pt").input_ids

    dataset = [{"pixel_values": transform(img), "input_ids": tokenize([cap])[0]} for img, cap in images]

    def collate_fn(examples):
        pixel_values = torch.stack([e["pixel_values"] for e in examples]).contiguous().float()
        return {"pixel_values": pixel_values, "input_ids": torch.stack([e["input_ids"] for e in examples])}

    dataloader = torch.utils.data.DataLoader(dataset, shuffle=True, collate_fn=collate_fn, batch_size=args.batch,
                                             num_workers=0)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    global_step, loss_value = 0, float("nan")
    while global_step < args.steps:
        unet.train()
        for batch in dataloader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                bsz = latents.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                          device=latents.device).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                target = noise
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                avg_loss = accelerator.gather(loss.repeat(args.batch)).mean()
                loss_value = avg_loss.item()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                global_step += 1
                stamps.append(time.perf_counter())
            if global_step >= args.steps:
                break
    end = time.perf_counter()
    return {"stamps": stamps, "total": end - start, "loss": loss_value}


def child(args: argparse.Namespace) -> None:
    out = run_ours(args) if args.child == "ours" else run_reference(args)
    stamps = out.pop("stamps")
    timed = len(stamps) - WARMUP
    out["steps_per_s"] = timed / (stamps[-1] - stamps[WARMUP - 1]) if timed > 0 else float("nan")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=("ours", "reference"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    common = ["--steps", str(args.steps), "--batch", str(args.batch), "--rank", str(args.rank),
              "--resolution", str(args.resolution)]
    runs: dict[str, list[dict]] = {"ours": [], "reference": []}
    for _ in range(args.repeats):
        for side in ("reference", "ours"):
            proc = subprocess.run([sys.executable, __file__, "--child", side, *common], capture_output=True,
                                  text=True, env=env, check=False)
            if proc.returncode != 0:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    best = {
        side: {
            "steps_per_s": max(r["steps_per_s"] for r in rs),
            "total": min(r["total"] for r in rs),
            "peak_rss_mb": min(r["peak_rss_mb"] for r in rs),
            "loss": rs[0]["loss"],
        }
        for side, rs in runs.items()
    }
    ours, ref = best["ours"], best["reference"]
    print(f"tiny SD1.5-shaped UNet, {args.resolution}x{args.resolution}, batch {args.batch}, rank {args.rank}, "
          f"{args.steps} steps, 1 thread, best of {args.repeats}\n")
    print("| | steps/s | end to end (s) | peak RSS (MB) | last loss |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in (("diffusers recipe (reference)", ref), ("lora-ops train", ours)):
        print(f"| {name} | {r['steps_per_s']:.2f} | {r['total']:.2f} | {r['peak_rss_mb']:.0f} | {r['loss']:.4f} |")
    print(f"| **ratio ours / reference** | **{ours['steps_per_s'] / ref['steps_per_s']:.2f}×** | "
          f"{ours['total'] / ref['total']:.2f}× | **{ours['peak_rss_mb'] / ref['peak_rss_mb']:.2f}×** | |")


if __name__ == "__main__":
    main()
