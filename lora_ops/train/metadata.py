"""kohya-style metadata for a trained LoRA (``ss_*``, ``modelspec.*``) and the base model's weight hash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .. import families
from .config import TrainConfig


def weights_sha256(modules: Mapping[str, nn.Module]) -> str:
    """SHA-256 over every parameter and buffer of the modules (name, dtype, shape, bytes; sorted by name).

    Identifies the exact base weights a LoRA was trained on, also for models that never were one file (a ComfyUI
    MODEL, a pipeline built in memory). Computed before LoRA is injected.
    """
    digest = hashlib.sha256()
    for part in sorted(modules):
        state = modules[part].state_dict()
        for name in sorted(state):
            t = state[name].detach()
            digest.update(f"{part}.{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                flat = t.to("cpu").contiguous().reshape(-1)
                digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def training_metadata(
    config: TrainConfig,
    *,
    family: str,
    prediction_type: str,
    steps_done: int,
    total_steps: int,
    epoch: int,
    num_images: int,
    tag_frequency: Mapping[str, Mapping[str, int]],
    dataset_dirs: Mapping[str, Mapping[str, int]],
    buckets: Sequence[tuple[int, int]],
    base: Mapping[str, str],
    base_hash: str | None,
    te_trained: bool,
    processes: int = 1,
) -> dict[str, str]:
    """The ``ss_*`` / ``modelspec.*`` entries kohya sd-scripts writes, for what this run actually did."""
    te_lr = config.text_encoder_lr if config.text_encoder_lr is not None else config.learning_rate
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": _num(config.effective_alpha),
        "ss_network_args": json.dumps({"rslora": config.rslora, "alpha": config.network_alpha,
                                       "targets": config.targets, "target_pattern": config.target_pattern}),
        "ss_learning_rate": _num(config.learning_rate),
        "ss_unet_lr": _num(config.learning_rate),
        "ss_text_encoder_lr": _num(te_lr) if te_trained else "0",
        "ss_network_train_unet_only": str(not te_trained),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_optimizer": (f"torch.optim.AdamW(betas=({_num(config.adam_beta1)}, {_num(config.adam_beta2)}), "
                         f"eps={_num(config.adam_epsilon)}, weight_decay={_num(config.weight_decay)})"),
        "ss_max_grad_norm": _num(config.max_grad_norm or 0.0),
        "ss_max_train_steps": str(total_steps),
        "ss_steps": str(steps_done),
        "ss_epoch": str(epoch),
        "ss_num_epochs": str(config.epochs) if config.epochs else "",
        "ss_batch_size_per_device": str(config.batch_size // processes),
        "ss_num_processes": str(processes),
        "ss_total_batch_size": str(config.batch_size * config.gradient_accumulation_steps),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_mixed_precision": {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[config.dtype],
        "ss_seed": str(config.seed),
        "ss_min_snr_gamma": _num(config.min_snr_gamma) if config.min_snr_gamma else "",
        "ss_noise_offset": _num(config.noise_offset) if config.noise_offset else "",
        "ss_caption_dropout_rate": _num(config.caption_dropout),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_enable_bucket": str(config.enable_bucket),
        "ss_min_bucket_reso": str(config.resolved_min_bucket()),
        "ss_max_bucket_reso": str(config.resolved_max_bucket()),
        "ss_bucket_info": json.dumps({"buckets": [list(b) for b in buckets]}),
        "ss_num_train_images": str(num_images),
        "ss_num_reg_images": "0",
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_training_comment": config.comment or "trained with lora-ops",
        "ss_base_model_version": families.get(family).ss_base_model_version,
        "ss_v2": "False",
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": families.get(family).modelspec_architecture,
        "modelspec.implementation": "https://github.com/huggingface/diffusers",
        "modelspec.title": config.title or config.output_name,
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.prediction_type": prediction_type,
    }
    if config.trigger_word.strip():
        meta["modelspec.trigger_phrase"] = config.trigger_word.strip()
    if base_hash:
        meta["lora_ops.base_weights_sha256"] = base_hash
    meta.update({k: v for k, v in base.items() if isinstance(v, str)})
    return {k: v for k, v in meta.items() if v != ""}


def _num(x: float) -> str:
    """A number as kohya writes it (``1e-4`` → ``0.0001``; integers without a trailing ``.0``)."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)
