"""LoraOpsTrain: MODEL + training data (+ settings) → LORA, MODEL with it applied, loss plot, report.

Data, exactly one of: LATENT (+ CONDITIONING, or captions and a CLIP); IMAGE + captions or + CONDITIONING (ComfyUI's
"Load Image and Text Dataset from Folder" gives both; the VAE encodes the images on ComfyUI); or ``data_folder``, a
kohya-layout folder inside ComfyUI's input folder (``N_name`` repeat folders, same-name ``.txt`` captions,
aspect-ratio buckets, unreadable files reported and skipped).

The loop is `lora_ops.train` with the ComfyUI backend (`comfy_train`) or, for a diffusers pipeline value, the
diffusers backend. Every run writes into its own folder ``output/loras/<run_name>_NNNNN/`` — the LoRA file
``<run_name>.safetensors`` (kohya format, kohya-style metadata), ``<run_name>.loss.json`` / ``.loss.png`` and
resumable checkpoints in ``<run_name>-checkpoints/`` — so a run never overwrites another; ``resume`` continues the
newest run folder of that name from its newest checkpoint (same settings required). Progress: ComfyUI's progress
bar, plus a ``loraops.train.progress`` message after every step (step, total, loss, lr) that web/loraops_train.js
draws as a live loss curve. Cancel stops before the next micro-batch, writes a checkpoint, and reports the run as
interrupted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import torch

from ..lora_ops.errors import LoraOpsError, LoraValueError
from ..lora_ops.io import safe_join
from ..lora_ops.train import Dataset, TrainConfig, Trainer
from . import comfy_env, comfy_host
from .apply import apply_items
from .comfy_train import ComfyBackend
from .diffusers_model import DiffusersModel
from .images import to_image_tensor
from .types import CATEGORY, LORA

log = logging.getLogger(__name__)

EVENT = "loraops.train.progress"
RUN_FOLDER = re.compile(r"^(?P<name>.+)_(?P<n>\d{5})$")


def run_folders(root: Path, name: str) -> list[Path]:
    """Existing ``<name>_NNNNN`` run folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group("n")), p) for p in root.iterdir()
             if p.is_dir() and (m := RUN_FOLDER.match(p.name)) and m.group("name") == name]
    return [p for _, p in sorted(found)]


def captions_from_text(text: str) -> list[str] | str:
    """One caption per non-empty line; a single line is used for every sample."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines if len(lines) > 1 else (lines[0] if lines else "")


def _encode_image_batch(backend: Any, images: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """IMAGE (B, H, W, 3) in [0, 1] → scaled latents (B, C, h, w), a few images at a time."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise LoraValueError("images must be an IMAGE batch (B, H, W, 3)")
    out = []
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            pixels = images[start : start + chunk, ..., :3].permute(0, 3, 1, 2).float() * 2 - 1  # (n, 3, H, W)
            out.append(backend.encode_images(pixels.to(backend.device)).float())
    return torch.cat(out)


class LoraOpsTrain:
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Train a LoRA on this MODEL from the graph's images or latents. Starts exactly at the base model (B = 0), "
        "shows progress and a live loss curve, can be cancelled and resumed, and writes a file with metadata."
    )
    RETURN_TYPES = (LORA, "MODEL", "IMAGE", "STRING")
    RETURN_NAMES = ("lora", "model", "loss_plot", "report")
    OUTPUT_TOOLTIPS = (
        "The trained LoRA (also saved in the run folder under output/loras/).",
        "The input MODEL with the trained LoRA applied at strength 1 (a clone).",
        "Training loss per step (raw and smoothed) and the fixed-batch evaluation loss.",
        "What was trained: steps, loss drop, data used and left out, the files written.",
    )
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to train on (LoRAs already applied stay underneath)."}),
                "steps": ("INT", {"default": 200, "min": 1, "max": 100000,
                                  "tooltip": "Optimizer steps (each sees batch_size × gradient_accumulation "
                                             "samples)."}),
                "rank": ("INT", {"default": 16, "min": 1, "max": 512, "tooltip": "LoRA rank r."}),
                "alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                                    "tooltip": "LoRA alpha (scale alpha/r); 0 = rank (scale 1)."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": False,
                                            "tooltip": "AdamW learning rate."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip": "Samples per micro-batch."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                 "tooltip": "Same seed and settings → the same LoRA, bit for bit (CPU)."}),
                "targets": (["attention", "attention+ff", "all-linear"],
                            {"default": "attention", "tooltip": "Which layers get LoRA: the four attention "
                                                                "projections (diffusers recipe), + feed-forward, "
                                                                "or every linear layer."}),
                "lr_scheduler": (["constant", "cosine", "linear"],
                                 {"default": "constant", "tooltip": "Learning-rate shape after the warm-up."}),
                "warmup_steps": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Linear LR warm-up."}),
                "run_name": ("STRING", {"default": "LoRA-Ops-train",
                                        "tooltip": "Run folder output/loras/<run_name>_NNNNN/ (file, loss, "
                                                   "checkpoints); a new number per run."}),
                "resume": ("BOOLEAN", {"default": False,
                                       "tooltip": "Continue the newest run of this name from its newest checkpoint "
                                                  "(needs the same settings)."}),
            },
            "optional": {
                "latents": ("LATENT", {"tooltip": "Training images already encoded (VAE Encode)."}),
                "data_folder": ("STRING", {"default": "",
                                           "tooltip": "Or: a folder inside ComfyUI's input folder, kohya layout "
                                                      "(image.png + image.txt, N_name repeat folders)."}),
                "positive": ("CONDITIONING", {"tooltip": "Conditioning of the latents/images: one for all, or one "
                                                         "each (instead of captions)."}),
                "images": ("IMAGE", {"tooltip": "Or: training images; needs the VAE on ComfyUI."}),
                "captions": ("STRING", {"default": "", "multiline": True,
                                        "tooltip": "One caption per line (one line = for every image); needs the "
                                                   "CLIP on ComfyUI. Used for metadata with CONDITIONING."}),
                "vae": ("VAE", {"tooltip": "Encodes IMAGE inputs."}),
                "clip": ("CLIP", {"tooltip": "Encodes captions (and the empty caption for caption dropout)."}),
                "trigger_word": ("STRING", {"default": "", "tooltip": "Prepended to every caption; in the metadata."}),
                "gradient_accumulation": ("INT", {"default": 1, "min": 1, "max": 256,
                                                  "tooltip": "Micro-batches per optimizer step."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 64,
                                       "tooltip": "Bucket size for IMAGE inputs (about resolution² pixels)."}),
                "max_grad_norm": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                            "tooltip": "Gradient-norm clipping; 0 = off."}),
                "min_snr_gamma": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.5,
                                            "tooltip": "min-SNR-γ loss weighting (5 is common); 0 = off."}),
                "noise_offset": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                           "tooltip": "Offset noise strength; 0 = off."}),
                "caption_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                              "tooltip": "Chance of training a sample with the empty caption "
                                                         "(needs the CLIP)."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False,
                                                       "tooltip": "Recompute activations in the backward pass: "
                                                                  "much less memory, about a third slower."}),
                "rslora": ("BOOLEAN", {"default": False, "tooltip": "Rank-stabilised scale alpha/√r."}),
                "training_dtype": (["float32", "bfloat16", "float16"],
                                   {"default": "float32", "tooltip": "Autocast dtype of the frozen model's forward; "
                                                                     "LoRA weights stay float32."}),
                "save_every_steps": ("INT", {"default": 0, "min": 0, "max": 100000,
                                             "tooltip": "Resumable checkpoint every N steps; 0 = only on cancel."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    @classmethod
    def IS_CHANGED(cls, data_folder="", **_):
        """A data folder is re-read when any file in it changes (name, size or time); graph inputs speak for
        themselves."""
        if not data_folder or not data_folder.strip():
            return ""
        try:
            root = safe_join(comfy_env.input_dir(), data_folder.strip())
            files = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                           for p in root.rglob("*") if p.is_file())
        except (OSError, LoraOpsError):
            return float("nan")  # never equal: re-run, and let the node report the problem
        return hashlib.sha256(repr(files).encode()).hexdigest()

    @classmethod
    def VALIDATE_INPUTS(cls, run_name="LoRA-Ops-train", **_):
        if isinstance(run_name, str) and (not run_name.strip() or not re.fullmatch(r"[\w.\- ]+", run_name)):
            return f"run_name '{run_name}' must be a plain name (letters, digits, ._- and spaces; no folders)"
        return True

    def train(self, model, steps, rank, alpha, learning_rate, batch_size, seed, targets, lr_scheduler, warmup_steps,
              run_name, resume, latents=None, data_folder="", positive=None, images=None, captions="", vae=None,
              clip=None,
              trigger_word="", gradient_accumulation=1, resolution=512, max_grad_norm=1.0, min_snr_gamma=0.0,
              noise_offset=0.0, caption_dropout=0.0, gradient_checkpointing=False, rslora=False,
              training_dtype="float32", save_every_steps=0, unique_id=None):
        ok = self.VALIDATE_INPUTS(run_name=run_name)
        if ok is not True:
            raise LoraValueError(ok)
        root = safe_join(comfy_env.output_dir(), "loras")
        folders = run_folders(root, run_name)
        if resume:
            if not folders:
                raise LoraValueError(f"no earlier run named '{run_name}' to resume", hint=f"looked in {root}")
            folder = folders[-1]
        else:
            number = int(RUN_FOLDER.match(folders[-1].name).group("n")) + 1 if folders else 1
            folder = root / f"{run_name}_{number:05d}"
        config = TrainConfig(
            rank=int(rank), alpha=float(alpha) or None, rslora=bool(rslora), targets=targets,
            max_steps=int(steps), batch_size=int(batch_size), gradient_accumulation_steps=int(gradient_accumulation),
            learning_rate=float(learning_rate), lr_scheduler=lr_scheduler, lr_warmup_steps=int(warmup_steps),
            max_grad_norm=float(max_grad_norm) or None, min_snr_gamma=float(min_snr_gamma) or None,
            noise_offset=float(noise_offset), caption_dropout=float(caption_dropout), resolution=int(resolution),
            trigger_word=trigger_word.strip(), seed=int(seed), dtype=training_dtype, device="model",
            gradient_checkpointing=bool(gradient_checkpointing),
            save_every_steps=int(save_every_steps), output_dir=str(folder), output_name=run_name, overwrite=True,
        )
        host = self._backend(model, clip, vae, training_dtype)
        with torch.inference_mode(False), torch.enable_grad(), host as backend:
            data = self._dataset(backend, latents, positive, images, captions, data_folder.strip())
            checkpoint = folder / f"{run_name}-checkpoints" if resume else None
            result = self._run(config, backend, data, checkpoint, unique_id)
        if result.status != "completed":
            comfy_env.throw_if_interrupted()  # ComfyUI shows the run as interrupted; the checkpoint is on disk
            raise LoraValueError(f"training stopped at step {result.step} of {result.total_steps}",
                                 hint=f"resume from {result.checkpoint}")
        new_model, _, coverage = apply_items(model, None, [(result.lora, 1.0, 1.0)])
        return (result.lora, new_model, to_image_tensor(result.plot(title=folder.name)),
                self._report(result, folder, coverage))

    # ----------------------------------------------------------------------------------------------- parts
    @contextlib.contextmanager
    def _backend(self, model: Any, clip: Any, vae: Any, training_dtype: str):
        if isinstance(model, DiffusersModel):
            from ..lora_ops.train.diffusers_backend import DiffusersBackend

            with model.activated() as pipe:  # LoRAs applied upstream stay underneath while training
                yield DiffusersBackend(pipe)
        elif comfy_host.is_model_patcher(model):
            backend = ComfyBackend(model, clip=clip, vae=vae)
            backend.load()
            weights = next(backend.denoiser().parameters()).dtype
            if backend.device.type == "cpu" and training_dtype not in ("float32", str(weights).split(".")[-1]):
                raise LoraValueError(f"on the CPU, a {weights} model cannot be trained with {training_dtype} autocast "
                                     "(CPU autocast leaves group norms in the weights' dtype)",
                                     hint="set training_dtype to float32")
            yield backend
        else:
            raise LoraValueError(f"MODEL is neither a ComfyUI model nor a diffusers pipeline "
                                 f"(got {type(model).__name__})")

    @staticmethod
    def _dataset(backend: Any, latents: Any, positive: Any, images: Any, captions: str, folder: str) -> Dataset:
        caps = captions_from_text(captions or "")
        if sum(x is not None and x != "" for x in (latents, images, folder)) != 1:
            raise LoraValueError("give the training data as exactly one of latents, images or data_folder",
                                 hint="connect LATENT (VAE Encode) or IMAGE, or name a folder in the input folder")
        if positive is not None and not isinstance(backend, ComfyBackend):
            raise LoraValueError("CONDITIONING comes from ComfyUI's CLIP; a diffusers MODEL encodes captions itself",
                                 hint="give captions instead")
        if folder:
            if positive is not None:
                raise LoraValueError("a data_folder brings its own captions", hint="disconnect positive")
            path = safe_join(comfy_env.input_dir(), folder)  # refuses ../ and absolute paths
            return Dataset.from_folder(path)
        conds = backend.conditioning(positive) if positive is not None else None
        if images is not None:
            if conds is None:
                return Dataset.from_images(images, caps)
            scaled = _encode_image_batch(backend, images)
        else:
            if not isinstance(latents, dict) or not isinstance(latents.get("samples"), torch.Tensor):
                raise LoraValueError("latents must be a LATENT (a dict with 'samples')")
            scaled = backend.process_latents(latents["samples"])
        if conds is None and not (caps if isinstance(caps, list) else caps.strip()):
            raise LoraValueError("latents need their conditioning: connect positive, or write captions")
        return Dataset.from_latents(scaled, caps, conds=conds)

    @staticmethod
    def _run(config: TrainConfig, backend: Any, data: Dataset, checkpoint: Path | None, unique_id: Any):
        bar = comfy_env.Progress(config.max_steps)
        node = str(unique_id) if unique_id is not None else None

        def progress(step: int, total: int, loss: float) -> None:
            lr = trainer.optimizer.param_groups[0]["lr"]
            comfy_env.send_event(EVENT, {"node": node, "step": step, "total": total, "loss": loss, "lr": lr})
            bar.update_absolute(step, total)

        with Trainer(config, backend, data, progress=progress, should_stop=comfy_env.interrupted,
                     resume_from=checkpoint) as trainer:
            comfy_env.send_event(EVENT, {"node": node, "step": trainer.step, "total": trainer.total_steps,
                                         "reset": True})
            try:
                return trainer.run()
            finally:
                comfy_env.send_event(EVENT, {"node": node, "done": True})

    @staticmethod
    def _report(result: Any, folder: Path, coverage: str) -> str:
        h = result.history
        lines = [f"trained {result.step}/{result.total_steps} steps; {result.report.summary()}"]
        if len(h.eval_loss) >= 2:
            first, last = h.eval_loss[0], h.eval_loss[-1]
            lines.append(f"evaluation loss {first:.4f} → {last:.4f} ({100 * (first - last) / first:+.1f}% drop)")
        written = [p.name for p in (result.output, result.history_file, result.plot_file) if p is not None]
        lines.append(f"files in {folder}: {', '.join(written)}")
        lines.append(f"applied: {coverage}")
        return "\n".join(lines)
