"""A diffusers Stable Diffusion 1.x / SDXL pipeline as a `TrainingBackend`.

Encoding follows the diffusers training scripts: VAE latents × ``scaling_factor`` (the distribution's mean is
used, since latents are cached once: every epoch sees the same latents), CLIP token ids padded to
``model_max_length``; SD 1.x conditions on the last hidden state of the text encoder, SDXL on the penultimate
hidden states of both encoders concatenated plus the second encoder's pooled projection and the six
micro-conditioning numbers. The noise schedule is the pipeline scheduler's config read as a DDPM training schedule
(as ``DDPMScheduler.from_pretrained(…, subfolder="scheduler")`` does in the scripts), with its prediction type.

diffusers is imported lazily; the pipeline itself is duck-typed (``unet``, ``vae``, ``text_encoder[_2]``,
``tokenizer[_2]``, ``scheduler``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import families, keymap
from ..errors import LoraFileError, LoraValueError, UnsafeFileError
from .backend import Conditioning
from .schedule import NoiseSchedule

Tensor = torch.Tensor

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SKIPPED_COMPONENTS = ("safety_checker",)
"""Components `from_pretrained` never loads (passed as None), so their weight files are not checked."""


def pickled_weights(folder: Path, index: Mapping[str, Any]) -> list[Path]:
    """The pickle files diffusers would load from a pipeline ``folder``: for each model component of
    ``model_index.json``, its pickled weights when the component folder holds no ``.safetensors`` file
    (diffusers prefers safetensors where both exist)."""
    found = []
    for name, spec in index.items():
        sub = folder / name
        if name.startswith("_") or name in SKIPPED_COMPONENTS or not isinstance(spec, list) or None in spec:
            continue
        if not sub.is_dir() or any(sub.glob("*.safetensors")):
            continue
        found += sorted(p for p in sub.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())
    return found


class DiffusersBackend:
    """Train on a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline`` (any widths, e.g. the tiny ones)."""

    def __init__(self, pipe: Any, *, model_name: str | None = None, model_hash: str | None = None):
        self.pipe = pipe
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        unet_paths = [n for n, m in pipe.unet.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
        self.family = "sdxl" if self.sdxl else "sd1"  # the pipeline class says which; the UNet must agree
        detected = keymap.detect_unet_family(unet_paths)
        if detected not in (None, self.family):
            raise LoraValueError(f"the UNet is {families.label(detected)}-shaped but the pipeline is "
                                 f"{families.label(self.family)}'s", hint="check the model folder")
        self.model_name = model_name
        self.model_hash = model_hash
        self._ids: dict[tuple[int, str], Tensor] = {}
        self._gc_before = bool(getattr(pipe.unet, "is_gradient_checkpointing", False))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False
                        ) -> DiffusersBackend:
        """Load a local diffusers pipeline folder (``model_index.json``); never downloads.

        Safetensors weights only, unless ``allow_pickle``: a component whose weights are pickled (``.bin``,
        ``.pt`` …) is refused naming the file, before anything is loaded. With ``allow_pickle`` diffusers and
        transformers load them with ``torch.load(weights_only=True)`` (their default in the pinned versions; the
        tests check it).
        """
        folder = Path(path)
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            raise LoraFileError("not a diffusers pipeline folder", file=folder, hint="expected model_index.json")
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise LoraFileError(f"cannot read model_index.json ({type(err).__name__})", file=index_file) from None
        if not isinstance(index, dict):
            raise LoraFileError("model_index.json is not a JSON object", file=index_file)
        pickles = pickled_weights(folder, index)
        if pickles and not allow_pickle:
            raise UnsafeFileError(
                f"the model's weights are a pickle ({len(pickles)} file(s) without a .safetensors beside them); "
                "pickle files can run code",
                file=pickles[0],
                hint="convert the folder to safetensors (save_pretrained(…, safe_serialization=True)), or pass "
                     "allow_pickle=True if you trust it",
            )
        name = str(index.get("_class_name", ""))
        import diffusers

        options: dict[str, Any] = {"torch_dtype": dtype, "local_files_only": True,
                                   "use_safetensors": None if allow_pickle else True}
        if "XL" not in name:
            options.update(safety_checker=None, requires_safety_checker=False)
        pipeline = diffusers.StableDiffusionXLPipeline if "XL" in name else diffusers.StableDiffusionPipeline
        try:
            pipe = pipeline.from_pretrained(folder, **options)
        except (OSError, ValueError) as err:  # a missing or unreadable component, a config diffusers refuses
            text = " ".join(str(err).split())
            raise LoraFileError(f"cannot load the diffusers pipeline ({text[:300]})", file=folder) from None
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, model_name=folder.name)

    # ---------------------------------------------------------------------------------------------- modules
    def denoiser(self) -> nn.Module:
        return self.pipe.unet

    def text_encoders(self) -> dict[str, nn.Module]:
        out = {"te1": self.pipe.text_encoder}
        if self.sdxl:
            out["te2"] = self.pipe.text_encoder_2
        return out

    def layer_keys(self, part: str) -> dict[str, str]:
        if part == "unet":
            canonical = keymap.unet_canonical_keys(self.pipe.unet, self.family)
        elif part in self.text_encoders():
            canonical = keymap.te_canonical_keys(self.text_encoders()[part], part)
        else:
            raise LoraValueError(f"this pipeline has no part '{part}'")
        return {path: key for key, path in canonical.items()}

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def to(self, device: torch.device) -> None:
        self.pipe.to(device)

    def set_gradient_checkpointing(self, enabled: bool, *, text_encoders: bool = False) -> None:
        unet = self.pipe.unet
        if enabled:
            unet.enable_gradient_checkpointing()
        elif not self._gc_before:
            unet.disable_gradient_checkpointing()
        if text_encoders:
            for te in self.text_encoders().values():
                te.gradient_checkpointing_enable() if enabled else te.gradient_checkpointing_disable()

    # ----------------------------------------------------------------------------------------------- math
    def noise_schedule(self) -> NoiseSchedule:
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(self.pipe.scheduler.config)
        return NoiseSchedule(
            prediction_type=sched.config.prediction_type,
            num_train_timesteps=int(sched.config.num_train_timesteps),
            alphas_cumprod=sched.alphas_cumprod.detach().float().clone(),
        )

    def encode_images(self, pixels: Tensor) -> Tensor:
        vae = self.pipe.vae
        dist = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        return self._scaled(dist.mean)  # (B, C, H/8, W/8)

    def process_latents(self, samples: Tensor) -> Tensor:
        """Raw VAE latents (e.g. ComfyUI's LATENT) → the scaled latents `encode_images` returns."""
        return self._scaled(samples.detach().float())

    def _scaled(self, latents: Tensor) -> Tensor:
        """The VAE's (latents - shift) · scaling_factor, as the UNet was trained on; a new tensor."""
        config = self.pipe.vae.config
        shift = getattr(config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return latents * config.scaling_factor

    def _tokens(self, which: int, prompts: Sequence[str]) -> Tensor:
        tokenizer = self.pipe.tokenizer if which == 1 else self.pipe.tokenizer_2
        missing = [p for p in dict.fromkeys(prompts) if (which, p) not in self._ids]
        if missing:
            ids = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids  # (n, 77)
            self._ids.update({(which, p): row for p, row in zip(missing, ids)})
        return torch.stack([self._ids[(which, p)] for p in prompts])  # (B, 77)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        te1 = self.pipe.text_encoder
        ids1 = self._tokens(1, prompts).to(te1.device)
        if not self.sdxl:
            return {"prompt_embeds": te1(ids1)[0]}  # (B, 77, hidden)
        te2 = self.pipe.text_encoder_2
        ids2 = self._tokens(2, prompts).to(te2.device)
        h1 = te1(ids1, output_hidden_states=True).hidden_states[-2]  # (B, 77, h1)
        out2 = te2(ids2, output_hidden_states=True)
        h2 = out2.hidden_states[-2]  # (B, 77, h2)
        return {"prompt_embeds": torch.cat([h1, h2], dim=-1), "pooled": out2[0]}  # (B, 77, h1+h2), (B, proj)

    def predict(self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Conditioning, micro: Tensor
                ) -> Tensor:
        dtype = next(iter(denoiser.parameters())).dtype  # conv_in's (ModelMixin.dtype walks every module)
        kwargs: dict[str, Any] = {"encoder_hidden_states": cond["prompt_embeds"].to(dtype)}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"].to(dtype), "time_ids": micro.to(dtype)}
        return denoiser(noisy.to(dtype), timesteps, **kwargs).sample

    def describe(self) -> Mapping[str, str]:
        out = {"ss_sd_model_name": self.model_name or type(self.pipe).__name__}
        if self.model_hash:
            out["ss_new_sd_model_hash"] = self.model_hash
        return out
