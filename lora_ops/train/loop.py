"""The training loop: one host-agnostic loop under Hugging Face Accelerate, cancellable and resumable.

Per optimizer step, for each of ``gradient_accumulation_steps`` micro-batches m:

1. the global batch of micro-step m (`data.epoch_batches`: depends only on seed and epoch);
2. noise, noise offset, timesteps and caption dropout for the whole global batch from a generator seeded by
   (seed, m) — so a resumed run, or N data-parallel processes each taking their share ``[rank::N]``, see exactly
   the numbers one uninterrupted process would;
3. x_t and the target from the host's `NoiseSchedule`, the host's prediction, MSE per sample (× min-SNR-γ weight);
4. backward of loss / accumulation steps.

Then the gradients are averaged across processes (one all-reduce of a flat buffer through ``accelerator.reduce``;
the host's module is never wrapped, so the same code serves UNet and text-encoder LoRA), clipped, and AdamW and
the LR schedule step. The loss reported per step is the global-batch mean.

Latents (the VAE is frozen) and caption embeddings (when the text encoders are frozen) are computed once, before
the first step, so every unreadable image is known before training starts.

Cancel: ``should_stop()`` (and Ctrl-C, caught by a SIGINT handler while training in the main thread; a second
Ctrl-C aborts at once) is checked before every micro-batch and before every update; a stop discards the partial
accumulation, writes a resumable checkpoint of the last completed step and returns ``status="cancelled"``. An
exception from a callback (ComfyUI's interrupt) also writes that checkpoint, then propagates.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import atomic, io
from ..errors import LoraFileError, LoraValueError
from ..lora import LoRA
from . import checkpoint as ckpt
from .adapter import TrainableLora, resolve_targets
from .backend import Conditioning, TrainingBackend
from .config import RESUME_MUST_MATCH, TrainConfig
from .data import (
    DataItem,
    DataReport,
    Dataset,
    epoch_batches,
    load_pixels,
    make_buckets,
    mix_seed,
    scan_folder,
    tag_frequency,
    with_trigger,
)
from .metadata import training_metadata, weights_sha256
from .schedule import lr_lambda

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ProgressCallback = Callable[[int, int, float], None]
StopCallback = Callable[[], bool]
ENCODE_CHUNK = 8
LATENT_FACTOR = 8  # pixels per latent cell (SD VAEs); only used for the micro-conditioning of pre-encoded data


@dataclass
class LossHistory:
    """Per optimizer step: training loss and learning rate; at chosen steps: the fixed-batch evaluation loss."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, list]:
        return {"steps": self.steps, "loss": self.loss, "lr": self.lr,
                "eval_steps": self.eval_steps, "eval_loss": self.eval_loss}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LossHistory:
        return cls(*(list(data.get(k, [])) for k in ("steps", "loss", "lr", "eval_steps", "eval_loss")))


@dataclass
class TrainResult:
    lora: LoRA
    status: str  # "completed" | "cancelled"
    step: int
    total_steps: int
    history: LossHistory
    report: DataReport
    output: Path | None = None  # the LoRA file (completed runs with output_dir)
    checkpoint: Path | None = None  # the last checkpoint written (always one when cancelled with output_dir)
    history_file: Path | None = None
    plot_file: Path | None = None
    main_process: bool = True  # False on the other processes of a data-parallel run (they write nothing)

    def plot(self, title: str | None = None):
        """The loss plot as a PIL image."""
        from ..plots_train import loss_plot

        return loss_plot(self.history, title=title)


@dataclass
class _Sample:
    item: DataItem
    caption: str  # with trigger word
    bucket: int
    latents: torch.Tensor  # (C, h, w) on the training device, fp32
    micro: torch.Tensor  # (6,) original h, w, crop top, left, target h, w


class _Stop(Exception):
    """Internal: a stop was requested between micro-batches."""


class Trainer:
    """One training run. Use as a context (``with Trainer(...) as t: result = t.run()``) or through `train`.

    Entering prepares everything (data decoded and encoded, LoRA injected, optimizer, resume); leaving takes the
    LoRA out of the host's modules again. Between the two, `predict` and `eval_loss` see the adapted model.
    """

    def __init__(
        self,
        config: TrainConfig,
        backend: TrainingBackend,
        data: Dataset | str | Path,
        *,
        progress: ProgressCallback | None = None,
        should_stop: StopCallback | None = None,
        resume_from: str | Path | None = None,
        show_progress: bool = False,
        accelerator: Any = None,
    ):
        self.config = config
        self.backend = backend
        self.data = data if isinstance(data, Dataset) else scan_folder(data, caption_extension=config.caption_extension)
        self.progress = progress
        self.should_stop = should_stop
        self.resume_from = resume_from
        self.show_progress = show_progress
        self.acc = accelerator
        self.adapter: TrainableLora | None = None
        self.step = 0
        self.history = LossHistory()
        self._interrupted = False
        self._aborted = False
        self._last_checkpoint: Path | None = None
        self._gc_set = False

    # ------------------------------------------------------------------------------------------------- set-up
    def __enter__(self) -> Trainer:
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup(self) -> None:
        c = self.config
        if self.acc is None:
            from accelerate import Accelerator

            on_cpu = c.device == "cpu" or (c.device == "model" and torch.device(self.backend.device).type == "cpu")
            self.acc = Accelerator(cpu=on_cpu)
        self.nproc, self.rank = self.acc.num_processes, self.acc.process_index
        if c.batch_size % self.nproc:
            raise LoraValueError(
                f"batch_size {c.batch_size} does not split over {self.nproc} processes",
                hint="the batch size is global: use a multiple of the number of processes",
            )
        if c.device == "model":
            if self.nproc > 1:
                raise LoraValueError("device='model' trains in one process", hint="use device='auto' with accelerate")
            self.device = torch.device(self.backend.device)
        else:
            self.device = self.acc.device
        self._check_outputs()
        if self.backend.device != self.device:
            self.backend.to(self.device)
        self.schedule = self.backend.noise_schedule()
        if c.min_snr_gamma and self.schedule.prediction_type == "flow":
            raise LoraValueError("min_snr_gamma is not defined for flow matching", hint="leave it unset")
        self.autocast_dtype = DTYPES[c.dtype]
        parts = {"unet": self.backend.denoiser()}
        if c.train_text_encoder:
            parts.update(self.backend.text_encoders())
        self.base_hash = weights_sha256({"unet": parts["unet"], **self.backend.text_encoders()}) \
            if c.hash_base_model else None
        self._prepare_data()
        targets = {}
        for part, module in parts.items():
            keys = resolve_targets(c, part, module, self.backend.layer_keys(part))
            if not keys:
                raise LoraValueError(f"no layer of '{part}' matches targets '{c.targets}'",
                                     hint=c.target_pattern or "check the preset / pattern against canonical keys")
            targets[part] = (module, keys)
        self.adapter = TrainableLora(c, targets, seed=c.seed)
        if c.gradient_checkpointing:
            self.backend.set_gradient_checkpointing(True, text_encoders=c.train_text_encoder)
            self._gc_set = True
        te_lr = c.text_encoder_lr if c.text_encoder_lr is not None else c.learning_rate
        self.optimizer = _adamw(self.adapter.param_groups(c.learning_rate, te_lr), c)
        self.total_steps = self._total_steps()
        lam = lr_lambda(c.lr_scheduler, c.lr_warmup_steps, self.total_steps)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, [lam] * len(self.optimizer.param_groups))
        # fp16 activations need loss scaling so that small gradients do not flush to zero (bf16 and fp32 do not)
        self.scaler = torch.amp.GradScaler(self.device.type) if c.dtype == "float16" else None
        self._prepare_eval()
        if self.resume_from is not None:
            self._resume(self.resume_from)
        log.info("training %d LoRA layers (%d parameters) for %d steps on %s; %s", len(self.adapter.params) // 2,
                 sum(p.numel() for p in self.adapter.params.values()), self.total_steps, self.device,
                 self.report.summary())

    def close(self) -> None:
        if self.adapter is not None:
            self.adapter.remove()
            self.adapter = None
        if self._gc_set:
            self.backend.set_gradient_checkpointing(False, text_encoders=self.config.train_text_encoder)
            self._gc_set = False

    def _check_outputs(self) -> None:
        c = self.config
        if c.output_dir is None:
            return
        out = self.output_path()
        if out.exists() and not c.overwrite and self.resume_from is None:
            raise LoraFileError("file already exists", file=out, hint="pass overwrite=True to replace it")

    def output_path(self) -> Path:
        return Path(self.config.output_dir or ".") / f"{self.config.output_name}.safetensors"

    def checkpoint_dir(self) -> Path:
        return Path(self.config.output_dir or ".") / f"{self.config.output_name}-checkpoints"

    # --------------------------------------------------------------------------------------------------- data
    def _prepare_data(self) -> None:
        c = self.config
        scanned = self.data.report  # copied: a Dataset may be trained on again
        self.report = DataReport([], list(scanned.skipped), list(scanned.ignored_folders))
        if c.enable_bucket:
            buckets = make_buckets(c.resolution, c.bucket_step, c.resolved_min_bucket(), c.resolved_max_bucket())
        else:
            buckets = [(c.resolution, c.resolution)]
        images = [item for item in self.data.items if item.encoded is None]
        encoded = [item for item in self.data.items if item.encoded is not None]
        if encoded and c.train_text_encoder:
            raise LoraValueError("text-encoder LoRA needs captions to encode, not pre-encoded conditioning",
                                 hint="give images/latents with captions, or train the UNet only")
        loaded = load_pixels(images, buckets, self.report)
        if self.report.skipped and c.on_bad_data == "error":
            raise LoraValueError(f"bad training data: {self.report.summary()}",
                                 hint="fix or remove these files, or use on_bad_data='skip'")
        if self.report.skipped:
            log.warning("training data: %s", self.report.summary())
        if not loaded and not encoded:
            raise LoraValueError("no usable training images", hint=self.report.summary())
        bucket_ids = {size: i for i, size in enumerate(buckets)}
        samples: list[_Sample] = []
        groups: dict[tuple[int, int], list[int]] = {}
        for img in loaded:
            h, w = img.pixels.shape[1:]
            ow, oh = img.original_size
            micro = torch.tensor([oh, ow, *img.crop_top_left, h, w], dtype=torch.float32)
            groups.setdefault((w, h), []).append(len(samples))
            samples.append(_Sample(img.item, with_trigger(img.item.caption, c.trigger_word), bucket_ids[(w, h)],
                                   torch.empty(0), micro))
        with torch.no_grad(), self._autocast():
            for size in sorted(groups):
                idx = groups[size]
                for start in range(0, len(idx), ENCODE_CHUNK):
                    chunk = idx[start : start + ENCODE_CHUNK]
                    pixels = torch.stack([loaded[i].pixels for i in chunk]).to(self.device)  # (n, 3, H, W)
                    latents = self.backend.encode_images(pixels).float()  # (n, C, h, w)
                    for i, lat in zip(chunk, latents):
                        samples[i].latents = lat
        self.cond_cache: dict[str, Conditioning] = {}
        cond_keys = [s.caption for s in samples]
        for item in encoded:  # ComfyUI's LATENT (+ CONDITIONING): the host's encoders already ran
            latents = item.encoded.latents.detach().to(self.device, torch.float32, copy=True)  # (C, h, w)
            h, w = (LATENT_FACTOR * n for n in latents.shape[-2:])  # pixel size, for SDXL's micro-conditioning
            if (w, h) not in bucket_ids:
                bucket_ids[(w, h)] = len(buckets)
                buckets.append((w, h))
            micro = torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32)
            samples.append(_Sample(item, with_trigger(item.caption, c.trigger_word), bucket_ids[(w, h)], latents,
                                   micro))
            self.report.used.append(item.source)
            if item.encoded.cond is None:
                cond_keys.append(samples[-1].caption)
            else:
                cond_keys.append(f"\0{item.source}")  # not a caption: the host's conditioning as given
                self.cond_cache[cond_keys[-1]] = {
                    k: v.detach().to(self.device, copy=True) for k, v in item.encoded.cond.items()
                }
        self.buckets = buckets
        self.samples = samples
        self.captions = [s.caption for s in samples]
        self.cond_keys = cond_keys
        if not c.train_text_encoder:
            unique = sorted({k for k in cond_keys if k not in self.cond_cache} | ({""} if c.caption_dropout else set()))
            with torch.no_grad(), self._autocast():
                for start in range(0, len(unique), ENCODE_CHUNK):
                    chunk = unique[start : start + ENCODE_CHUNK]
                    cond = self.backend.encode_prompts(chunk)
                    for j, caption in enumerate(chunk):
                        self.cond_cache[caption] = {k: v[j] for k, v in cond.items()}
        self.batches_per_epoch = sum(
            math.ceil(sum(s.item.repeats for s in samples if s.bucket == b) / c.batch_size)
            for b in sorted({s.bucket for s in samples})
        )
        self._epoch: tuple[int, list[list[int]]] | None = None
        digest = hashlib.sha256(json.dumps(
            [[s.item.source, s.caption, s.item.repeats, list(s.latents.shape), s.micro.tolist()] for s in samples]
        ).encode())
        self.data_fingerprint = digest.hexdigest()

    def _total_steps(self) -> int:
        c = self.config
        if c.epochs is not None:
            return math.ceil(c.epochs * self.batches_per_epoch / c.gradient_accumulation_steps)
        return int(c.max_steps or 0)

    def _batch(self, micro_step: int) -> list[int]:
        epoch, index = divmod(micro_step, self.batches_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            buckets = [s.bucket for s in self.samples]
            repeats = [s.item.repeats for s in self.samples]
            self._epoch = (epoch, epoch_batches(buckets, repeats, self.config.batch_size, self.config.seed, epoch))
        return self._epoch[1][index]

    def _cond(self, captions: Sequence[str]) -> Conditioning:
        if self.config.train_text_encoder:
            return self.backend.encode_prompts(list(captions))
        first = self.cond_cache[captions[0]]
        return {k: torch.stack([self.cond_cache[cap][k] for cap in captions]) for k in first}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # --------------------------------------------------------------------------------------------------- math
    def _micro_loss(self, micro_step: int) -> torch.Tensor:
        c = self.config
        batch = self._batch(micro_step)
        gen = torch.Generator().manual_seed(mix_seed(c.seed, micro_step, 0xA015E))
        shape = (len(batch), *self.samples[batch[0]].latents.shape)  # (B, C, h, w)
        noise = torch.randn(shape, generator=gen)
        if c.noise_offset:
            noise = noise + c.noise_offset * torch.randn((*shape[:2], 1, 1), generator=gen)  # (B, C, 1, 1)
        timesteps = self.schedule.sample_timesteps(len(batch), gen)
        dropped = torch.rand(len(batch), generator=gen) < c.caption_dropout
        mine = slice(self.rank, None, self.nproc)  # this process's share of the global batch
        idx = batch[mine]
        latents = torch.stack([self.samples[i].latents for i in idx])  # (b, C, h, w)
        noise, timesteps = noise[mine].to(self.device), timesteps[mine].to(self.device)
        captions = ["" if d else self.cond_keys[i] for i, d in zip(idx, dropped[mine].tolist())]
        micro = torch.stack([self.samples[i].micro for i in idx]).to(self.device)  # (b, 6)
        return self._loss(latents, noise, timesteps, captions, micro, weighted=True)

    def _loss(self, latents, noise, timesteps, captions, micro, *, weighted: bool) -> torch.Tensor:
        noisy, target = self.schedule.noisy_and_target(latents, noise, timesteps)
        with self._autocast():
            cond = self._cond(captions)
            pred = self.backend.predict(self.backend.denoiser(), noisy, timesteps, cond, micro)
        per_sample = F.mse_loss(pred.float(), target, reduction="none").mean(dim=tuple(range(1, target.ndim)))
        if weighted and self.config.min_snr_gamma:
            per_sample = per_sample * self.schedule.min_snr_weights(timesteps, self.config.min_snr_gamma, self.device)
        return per_sample.mean()

    def _prepare_eval(self) -> None:
        """A fixed evaluation set: the first images, each at evenly spread timesteps with fixed noise."""
        c = self.config
        n = min(c.eval_samples, len(self.samples))
        chosen = [round(i * (len(self.samples) - 1) / max(1, n - 1)) for i in range(n)] if n > 1 else [0]
        gen = torch.Generator().manual_seed(mix_seed(c.seed, 0xE7A1))
        ts = self.schedule.eval_timesteps(c.eval_timesteps)
        self.eval_set = []
        for i in dict.fromkeys(chosen):
            s = self.samples[i]
            k = len(ts)
            noise = torch.randn((k, *s.latents.shape), generator=gen)
            self.eval_set.append((i, noise, ts))

    @torch.no_grad()
    def eval_loss(self) -> float:
        """Unweighted MSE on the fixed evaluation set (no dropout); the model's train/eval mode is kept."""
        self.adapter.set_train(False)
        total, count = 0.0, 0
        for i, noise, ts in self.eval_set:
            s = self.samples[i]
            k = len(ts)
            latents = s.latents.expand(k, *s.latents.shape)
            loss = self._loss(latents, noise.to(self.device), ts.to(self.device), [self.cond_keys[i]] * k,
                              s.micro.expand(k, 6).to(self.device), weighted=False)
            total += float(loss) * k
            count += k
        return total / count

    @torch.no_grad()
    def predict(self, latents: torch.Tensor, timesteps: torch.Tensor, prompts: Sequence[str],
                micro: torch.Tensor | None = None) -> torch.Tensor:
        """The adapted denoiser's output (for tests and previews)."""
        if micro is None:
            h, w = latents.shape[-2:]
            f = 8
            micro = torch.tensor([[h * f, w * f, 0, 0, h * f, w * f]] * len(latents), dtype=torch.float32)
        with self._autocast():
            cond = self.backend.encode_prompts(list(prompts))
            return self.backend.predict(self.backend.denoiser(), latents.to(self.device), timesteps.to(self.device),
                                        cond, micro.to(self.device))

    # --------------------------------------------------------------------------------------------------- loop
    def _stop_requested(self) -> bool:
        local = self._interrupted or bool(self.should_stop is not None and self.should_stop())
        if self.nproc > 1:  # every process must stop at the same micro-batch
            flag = self.acc.reduce(torch.tensor([float(local)], device=self.device), reduction="sum")
            return bool(flag.item() > 0)
        return local

    def _sync_grads(self) -> None:
        params = list(self.adapter.params.values())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.nproc == 1:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        flat = self.acc.reduce(flat, reduction="mean")
        offset = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n

    def _train_step(self) -> float:
        c = self.config
        g = c.gradient_accumulation_steps
        losses = []
        self.adapter.set_train(True)
        try:
            for k in range(g):
                if self._stop_requested():
                    raise _Stop
                loss = self._micro_loss(self.step * g + k)
                if not torch.isfinite(loss):
                    raise LoraValueError(f"the loss became {float(loss)} at step {self.step + 1}",
                                         hint="lower the learning rate, or train in float32")
                scaled = loss / g
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                losses.append(loss.detach())
            if self._stop_requested():
                raise _Stop
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)  # drop the partial accumulation: resume redoes this step
            raise
        self._sync_grads()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # same grads on every process, so the same inf/skip decision
        if c.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(self.adapter.params.values()), c.max_grad_norm,
                                           foreach=self.device.type in ("cpu", "cuda"))
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        loss = torch.stack(losses).mean()
        if self.nproc > 1:
            loss = self.acc.reduce(loss, reduction="mean")
        value = float(loss)
        self.history.steps.append(self.step)
        self.history.loss.append(value)
        self.history.lr.append(float(lr))
        return value

    def _record_eval(self) -> None:
        if self.history.eval_steps and self.history.eval_steps[-1] == self.step:
            return
        self.history.eval_steps.append(self.step)
        self.history.eval_loss.append(self.eval_loss())

    def run(self) -> TrainResult:
        """Train to ``total_steps`` (or until stopped); write outputs on the main process; return the result."""
        if self.adapter is None:
            raise LoraValueError("Trainer.run() outside its context", hint="use `with Trainer(...) as t: t.run()`")
        c = self.config
        bar = self._progress_bar()
        status = "completed"
        with self._sigint():
            try:
                if not self.history.eval_steps:  # a resumed run already has its step-0 evaluation
                    self._record_eval()
                while self.step < self.total_steps:
                    value = self._train_step()
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{value:.4f}")
                    if c.eval_every_steps and self.step % c.eval_every_steps == 0:
                        self._record_eval()
                    if c.save_every_steps and self.step % c.save_every_steps == 0 and self.step < self.total_steps:
                        self.save_checkpoint()
                    if self.progress is not None:
                        self.progress(self.step, self.total_steps, value)
                self._record_eval()
            except (_Stop, KeyboardInterrupt):
                if self._aborted:  # a second Ctrl-C: the state may be mid-update, so no checkpoint
                    raise
                status = "cancelled"
                log.warning("training stopped at step %d of %d", self.step, self.total_steps)
                self._checkpoint_on_stop()
            except Exception as err:
                if not isinstance(err, LoraValueError) and self.nproc == 1:
                    try:  # e.g. ComfyUI's interrupt raised by a callback: keep the work done so far
                        self._checkpoint_on_stop()
                    except Exception as save_err:
                        log.error("could not write a checkpoint after the error: %s", save_err)
                raise
            finally:
                if bar is not None:
                    bar.close()
        return self._finish(status)

    def _checkpoint_on_stop(self) -> None:
        if self.config.output_dir is None:
            log.warning("no output_dir: the stopped run leaves no checkpoint to resume from")
            return
        if self.step == 0 and self.resume_from is None:
            return
        self.save_checkpoint()

    def _progress_bar(self):
        if not (self.show_progress and self.acc.is_main_process):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="training LoRA", unit="step", dynamic_ncols=True)

    @contextlib.contextmanager
    def _sigint(self):
        """Ctrl-C during training: stop cleanly after the current micro-batch; a second Ctrl-C aborts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._interrupted:
                self._aborted = True
                raise KeyboardInterrupt
            self._interrupted = True
            log.warning("interrupt received: stopping after this micro-batch (Ctrl-C again to abort)")

        try:
            previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not allowed here (embedded interpreters)
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    # -------------------------------------------------------------------------------------------- outputs
    def metadata(self) -> dict[str, str]:
        c = self.config
        micro_done = self.step * c.gradient_accumulation_steps
        by_folder: dict[str, dict[str, int]] = {}
        for s in self.samples:
            entry = by_folder.setdefault(s.item.folder, {"n_repeats": s.item.repeats, "img_count": 0})
            entry["img_count"] += 1
        return training_metadata(
            c,
            family=self.backend.family,
            prediction_type=self.schedule.prediction_type,
            steps_done=self.step,
            total_steps=self.total_steps,
            epoch=math.ceil(micro_done / self.batches_per_epoch),
            num_images=sum(s.item.repeats for s in self.samples),
            tag_frequency=tag_frequency([s.item for s in self.samples], self.captions),
            dataset_dirs=by_folder,
            buckets=sorted({self.buckets[s.bucket] for s in self.samples}),
            base=self.backend.describe(),
            base_hash=self.base_hash,
            te_trained=c.train_text_encoder,
            processes=self.nproc,
        )

    def lora(self) -> LoRA:
        """The adapter as it is now, as a `LoRA` value with metadata."""
        return self.adapter.to_lora(self.backend.family, self.metadata(), DTYPES[self.config.save_dtype])

    def _file_payload(self, lora: LoRA) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        from ..formats import write_lora

        options = {"component": "unet"} if self.config.save_format == "peft" else {}
        return write_lora(lora, self.config.save_format, **options)

    def save_checkpoint(self) -> Path | None:
        """Write a resumable checkpoint of the current step (main process); every process waits for it."""
        folder = None
        if self.acc.is_main_process and self.config.output_dir is not None:
            info = {
                "config": self.config.to_dict(),
                "total_steps": self.total_steps,
                "scheduler": self.lr_schedule.state_dict(),
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "history": self.history.to_dict(),
                "data_fingerprint": self.data_fingerprint,
                "family": self.backend.family,
            }
            folder = ckpt.save_checkpoint(
                self.checkpoint_dir() / ckpt.checkpoint_name(self.step),
                step=self.step,
                adapter=self.adapter.state(),
                optimizer=self.optimizer.state_dict(),
                info=info,
                lora_file=self._file_payload(self.lora()),
            )
            ckpt.prune_checkpoints(self.checkpoint_dir(), self.config.keep_checkpoints)
            self._last_checkpoint = folder
        self.acc.wait_for_everyone()
        return folder

    def _resume(self, path: str | Path) -> None:
        state = ckpt.load_checkpoint(path)
        saved = state.info.get("config", {})
        mismatched = [k for k in RESUME_MUST_MATCH if saved.get(k) != getattr(self.config, k)]
        if mismatched:
            shown = ", ".join(f"{k}: {saved.get(k)!r} → {getattr(self.config, k)!r}" for k in mismatched)
            raise LoraValueError(f"checkpoint was trained with other settings ({shown})", file=str(state.path),
                                 hint="resume with the checkpoint's settings")
        if state.info.get("data_fingerprint") != self.data_fingerprint:
            log.warning("%s: the training data changed since this checkpoint; the run will not match an "
                        "uninterrupted one", state.path)
        self.adapter.load_state(state.adapter)
        self.optimizer.load_state_dict(state.optimizer)
        self.lr_schedule.load_state_dict(state.info["scheduler"])
        if self.scaler is not None and state.info.get("grad_scaler"):
            self.scaler.load_state_dict(state.info["grad_scaler"])
        ckpt.restore_rng(state.rng["tensors"], state.rng["info"])
        self.step = state.step
        self.history = LossHistory.from_dict(state.info.get("history", {}))
        self._last_checkpoint = state.path
        log.info("resumed from %s at step %d", state.path, self.step)

    def _finish(self, status: str) -> TrainResult:
        c = self.config
        lora = self.lora()
        result = TrainResult(lora, status, self.step, self.total_steps, self.history, self.report,
                             checkpoint=self._last_checkpoint, main_process=self.acc.is_main_process)
        if c.output_dir is not None:
            out, name = Path(c.output_dir), c.output_name
            result.output = self.output_path() if status == "completed" else None
            result.history_file, result.plot_file = out / f"{name}.loss.json", out / f"{name}.loss.png"
            if self.acc.is_main_process:
                if result.output is not None:
                    tensors, meta = self._file_payload(lora)
                    overwrite = c.overwrite or self.resume_from is not None
                    result.output = io.save_state_dict(result.output, tensors, meta, overwrite=overwrite)
                    log.info("wrote LoRA file %s", result.output)
                payload = {"status": status, "step": self.step, "total_steps": self.total_steps,
                           **self.history.to_dict(), "config": c.to_dict()}
                atomic.write_text(result.history_file, json.dumps(payload, indent=1))
                image = result.plot(title=f"{name}: {status} at step {self.step}/{self.total_steps}")
                with atomic.atomic_write(result.plot_file) as tmp:  # PIL picks PNG from tmp's name
                    image.save(tmp)
        self.acc.wait_for_everyone()
        return result


def _adamw(groups: list[dict], c: TrainConfig) -> torch.optim.AdamW:
    """AdamW, fused where torch has the kernel (CPU and CUDA fp32: one kernel instead of ~10 ops per tensor)."""
    kwargs = dict(lr=c.learning_rate, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_epsilon,
                  weight_decay=c.weight_decay)
    devices = {p.device.type for g in groups for p in g["params"]}
    if devices <= {"cpu", "cuda"}:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # an older torch or an unsupported dtype/device
            pass
    return torch.optim.AdamW(groups, **kwargs)


def train(
    config: TrainConfig,
    backend: TrainingBackend,
    data: Dataset | str | Path,
    *,
    progress: ProgressCallback | None = None,
    should_stop: StopCallback | None = None,
    resume_from: str | Path | None = None,
    show_progress: bool = False,
) -> TrainResult:
    """Train a LoRA on ``backend``'s model from ``data`` (a folder, or `Dataset.from_images`).

    ``progress(step, total, loss)`` is called after every optimizer step; ``should_stop()`` before every
    micro-batch. Returns the `TrainResult` (``status`` "completed" or "cancelled"); the host's model is left as it
    was. With ``config.output_dir`` the LoRA file, ``<name>.loss.json``, ``<name>.loss.png`` and checkpoints are
    written there (by the main process only under ``accelerate launch``).
    """
    with Trainer(config, backend, data, progress=progress, should_stop=should_stop, resume_from=resume_from,
                 show_progress=show_progress) as trainer:
        return trainer.run()
