"""Training settings: one dataclass with sensible defaults, validated once, JSON round-trippable.

Defaults follow the diffusers LoRA recipe: rank 16, alpha = rank, the four attention projections, A gaussian and
B zero so that step 0 is the base model. Targets are chosen on canonical keys (``unet.<LDM path>``,
``te1.text_model…``), so one preset or pattern means the same layers on every host.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import LoraValueError

# Canonical-key suffixes per preset. LDM and diffusers spell these the same (attn1/attn2.to_q …, ff.net.0.proj).
UNET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention+ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
}
TE_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "attention+ff": ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"),
}
TARGETS = ("attention", "attention+ff", "all-linear", "custom")
LR_SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("float32", "bfloat16", "float16")
ON_BAD_DATA = ("skip", "error")
SAVE_FORMATS = ("kohya", "diffusers", "comfyui", "peft")
DEVICES = ("auto", "cpu", "model")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run. ``None`` means "derived" (documented per field)."""

    # --- the adapter
    rank: int = 16
    alpha: float | None = None  # None: alpha = rank (scale 1)
    rslora: bool = False  # scale alpha/√r instead of alpha/r (rank-stabilised LoRA)
    targets: str = "attention"  # attention | attention+ff | all-linear | custom
    target_pattern: str | None = None  # targets="custom": regex searched in canonical keys (unet.… / te1.…)
    train_text_encoder: bool = False  # also train LoRA on the text encoder(s) (their attention projections)
    text_encoder_lr: float | None = None  # None: learning_rate

    # --- how long
    max_steps: int | None = 500  # optimizer steps; ignored when epochs is set
    epochs: int | None = None  # passes over the data (repeats included)
    batch_size: int = 1  # global batch (split across processes under accelerate launch)
    gradient_accumulation_steps: int = 1

    # --- optimiser (AdamW) and schedule
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"  # constant | cosine | linear (all with lr_warmup_steps of linear warm-up)
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float | None = 1.0  # None or 0: no clipping

    # --- loss
    min_snr_gamma: float | None = None  # min-SNR-γ weighting (5.0 is the paper's value); None: plain MSE
    noise_offset: float = 0.0  # add noise_offset · N(0,1) per sample and channel to the noise

    # --- data
    resolution: int = 512  # max side of the square bucket; buckets keep about resolution² pixels
    enable_bucket: bool = True  # aspect-ratio buckets; False: every image centre-cropped to resolution²
    bucket_step: int = 64
    min_bucket_size: int | None = None  # None: resolution // 2
    max_bucket_size: int | None = None  # None: resolution * 2
    trigger_word: str = ""  # prepended to every caption ("sks, a photo of …")
    caption_dropout: float = 0.0  # probability of training a sample with the empty caption
    caption_extension: str = ".txt"
    on_bad_data: str = "skip"  # skip: report unreadable images / missing captions and go on; error: stop first

    # --- run
    seed: int = 0
    gradient_checkpointing: bool = False
    dtype: str = "float32"  # autocast dtype of the frozen model's forward; LoRA weights and AdamW stay fp32
    device: str = "auto"  # auto (what accelerate picks) | cpu | model (where the host's model already is)
    save_every_steps: int = 0  # periodic resumable checkpoints; 0: only on cancel
    keep_checkpoints: int | None = None  # keep the newest N periodic checkpoints; None: all
    eval_every_steps: int = 0  # loss on a fixed evaluation batch (fixed noise and timesteps); 0: start and end only
    eval_samples: int = 4  # images in the evaluation batch (each at eval_timesteps timesteps)
    eval_timesteps: int = 4

    # --- output
    output_dir: str | None = None  # None: nothing written (the LoRA, history and plot are returned)
    output_name: str = "lora"
    save_format: str = "kohya"  # kohya | diffusers | comfyui | peft (UNet only)
    save_dtype: str = "float32"  # float32 | float16 | bfloat16
    overwrite: bool = False
    title: str = ""  # modelspec.title
    comment: str = ""  # ss_training_comment
    hash_base_model: bool = True  # SHA-256 of the base weights in the metadata (seconds on a real model)

    def __post_init__(self) -> None:
        _check(self)

    # ------------------------------------------------------------------------------------------ derived values
    @property
    def network_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def effective_alpha(self) -> float:
        """The alpha a LoRA file needs so that alpha/r is the training scale (alpha/√r under rsLoRA)."""
        return self.network_alpha * (self.rank**0.5 if self.rslora else 1.0)

    def resolved_min_bucket(self) -> int:
        return self.min_bucket_size or max(self.bucket_step, self.resolution // 2)

    def resolved_max_bucket(self) -> int:
        return self.max_bucket_size or self.resolution * 2

    # --------------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LoraValueError(f"unknown training setting(s): {', '.join(unknown)}", hint="see TrainConfig")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise LoraValueError(f"cannot read training settings ({err})", hint=str(path)) from None
        if not isinstance(data, dict):
            raise LoraValueError("training settings must be a JSON object", hint=str(path))
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})


# Settings that change the trained weights' meaning; a checkpoint is resumed only when these match.
RESUME_MUST_MATCH = (
    "rank", "alpha", "rslora", "targets", "target_pattern", "train_text_encoder", "batch_size",
    "gradient_accumulation_steps", "seed", "resolution", "enable_bucket", "bucket_step", "min_bucket_size",
    "max_bucket_size",
)


def _check(c: TrainConfig) -> None:
    def need(ok: bool, what: str, hint: str | None = None) -> None:
        if not ok:
            raise LoraValueError(f"invalid training setting: {what}", hint=hint)

    need(isinstance(c.rank, int) and c.rank >= 1, f"rank must be a positive integer, got {c.rank!r}")
    need(c.alpha is None or c.alpha > 0, f"alpha must be positive, got {c.alpha}")
    need(c.targets in TARGETS, f"targets '{c.targets}'", f"use one of {', '.join(TARGETS)}")
    if c.targets == "custom":
        need(bool(c.target_pattern), "targets='custom' needs target_pattern", "a regex on canonical keys")
        try:
            re.compile(c.target_pattern or "")
        except re.error as err:
            raise LoraValueError(f"invalid training setting: target_pattern is not a regex ({err})") from None
    need(c.epochs is not None or c.max_steps is not None, "give max_steps or epochs")
    need(c.epochs is None or c.epochs >= 1, f"epochs must be ≥ 1, got {c.epochs}")
    need(c.max_steps is None or c.max_steps >= 0, f"max_steps must be ≥ 0, got {c.max_steps}")
    need(c.batch_size >= 1, f"batch_size must be ≥ 1, got {c.batch_size}")
    need(c.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be ≥ 1")
    need(c.learning_rate > 0, f"learning_rate must be positive, got {c.learning_rate}")
    need(c.text_encoder_lr is None or c.text_encoder_lr >= 0, "text_encoder_lr must be ≥ 0")
    need(c.lr_scheduler in LR_SCHEDULES, f"lr_scheduler '{c.lr_scheduler}'", f"use one of {', '.join(LR_SCHEDULES)}")
    need(c.lr_warmup_steps >= 0, "lr_warmup_steps must be ≥ 0")
    need(0 <= c.adam_beta1 < 1 and 0 <= c.adam_beta2 < 1, "adam betas must be in [0, 1)")
    need(c.adam_epsilon > 0 and c.weight_decay >= 0, "adam_epsilon must be > 0 and weight_decay ≥ 0")
    need(c.max_grad_norm is None or c.max_grad_norm >= 0, "max_grad_norm must be ≥ 0")
    need(c.min_snr_gamma is None or c.min_snr_gamma > 0, "min_snr_gamma must be positive")
    need(c.noise_offset >= 0, "noise_offset must be ≥ 0")
    need(c.bucket_step >= 8 and c.bucket_step % 8 == 0, f"bucket_step must be a multiple of 8, got {c.bucket_step}")
    need(c.resolution >= c.bucket_step and c.resolution % c.bucket_step == 0,
         f"resolution {c.resolution} must be a multiple of bucket_step {c.bucket_step}")
    need(c.resolved_min_bucket() <= c.resolution <= c.resolved_max_bucket(),
         "min_bucket_size ≤ resolution ≤ max_bucket_size")
    need(0 <= c.caption_dropout < 1, f"caption_dropout must be in [0, 1), got {c.caption_dropout}")
    need(c.on_bad_data in ON_BAD_DATA, f"on_bad_data '{c.on_bad_data}'", "use skip or error")
    need(c.dtype in DTYPES, f"dtype '{c.dtype}'", f"use one of {', '.join(DTYPES)}")
    need(c.save_dtype in DTYPES, f"save_dtype '{c.save_dtype}'", f"use one of {', '.join(DTYPES)}")
    need(c.device in DEVICES, f"device '{c.device}'", f"use one of {', '.join(DEVICES)}")
    need(c.save_every_steps >= 0 and c.eval_every_steps >= 0, "save/eval intervals must be ≥ 0")
    need(c.keep_checkpoints is None or c.keep_checkpoints >= 1, "keep_checkpoints must be ≥ 1")
    need(c.eval_samples >= 1 and c.eval_timesteps >= 1, "eval_samples and eval_timesteps must be ≥ 1")
    need(not (c.save_format == "peft" and c.train_text_encoder), "a PEFT file holds one model",
         "use save_format diffusers or kohya with text-encoder LoRA")
    need(c.save_format in SAVE_FORMATS, f"save_format '{c.save_format}'", f"use one of {', '.join(SAVE_FORMATS)}")
    need(bool(c.output_name) and "/" not in c.output_name and "\\" not in c.output_name and c.output_name != "..",
         f"output_name '{c.output_name}' must be a plain file name")
