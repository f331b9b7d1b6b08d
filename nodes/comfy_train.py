"""ComfyUI's MODEL (+ CLIP, VAE) as a `lora_ops.train.TrainingBackend`: the loop trains on the graph's own model.

What ComfyUI supplies, and how it is read:

- the denoiser: ``ModelPatcher.model.diffusion_model`` (LDM module names, so canonical keys are ``unet.<path>``
  exactly as `comfy_host` applies them). The patcher is loaded first (``load_models_gpu``, full load), so LoRAs
  already applied upstream are in the weights we train on top of;
- the noise schedule: the patcher's ``model_sampling`` object, which nodes such as ``ModelSamplingDiscrete`` /
  ``ModelSamplingSD3`` replace: discrete ε or v-prediction (ᾱ = 1 / (1 + σ²) from its σ table) or discrete flow
  (rectified flow with its shift and timestep multiplier). Other samplings (EDM, Flux's exponential shift, …) are
  refused with their name rather than trained with the wrong target;
- the prediction: the denoiser is called as `BaseModel._apply_model` calls it, ``diffusion_model(x_t, t,
  context=…)``, with x_t already in the host's input scaling (x_t = √ᾱ·x₀ + √(1-ᾱ)·ε equals ComfyUI's
  ``calculate_input(σ, x₀ + σ·ε)``; flow models take x_t unscaled) and t the model timestep (the ᾱ index, or
  σ·multiplier). Its raw output is then ε, v or ε - x₀, the schedule's target;
- images and captions: VAE ``encode`` + ``process_latent_in``; CLIP ``tokenize`` + ``encode_from_tokens``. LATENT and
  CONDITIONING from the graph skip them (``process_latents`` scales a LATENT like ``process_latent_in``).

Families: SD 1.x / 2.x (``BaseModel``: cross-attention context only) and SDXL (``SDXL``: also the vector ``y`` that
ComfyUI's own ``encode_adm`` builds from the pooled text embedding and the six size/crop numbers, per sample).
Other model classes (Flux, SD3, video models, …) are refused with their name rather than trained wrongly.

ComfyUI runs every node under ``torch.inference_mode()``; tensors created there (a checkpoint's weights, LATENT,
CONDITIONING) cannot take part in autograd. `make_trainable` swaps such parameters and buffers of the denoiser
for equal normal tensors (the values do not change, only their autograd status, as ComfyUI's own patching also
replaces parameters); the node runs the loop under ``torch.inference_mode(False)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from ..lora_ops import families
from ..lora_ops.errors import LoraValueError
from ..lora_ops.train.backend import Conditioning
from ..lora_ops.train.schedule import NoiseSchedule
from . import comfy_host

log = logging.getLogger(__name__)

Tensor = torch.Tensor
# ComfyUI model classes we can condition: (x, t, context) only, or SDXL's (x, t, context, y).
CONTEXT_ONLY_MODELS = ("BaseModel",)
SDXL_MODELS = ("SDXL",)


def make_trainable(module: nn.Module) -> int:
    """Replace inference-mode parameters/buffers of ``module`` by equal normal tensors; returns how many."""
    swapped = 0
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, param in list(sub.named_parameters(recurse=False)):
                if param.is_inference():
                    setattr(sub, name, nn.Parameter(param.detach().clone(), requires_grad=False))
                    swapped += 1
            for name, buf in list(sub.named_buffers(recurse=False)):
                if buf is not None and buf.is_inference():
                    sub.register_buffer(name, buf.clone(), persistent=name not in sub._non_persistent_buffers_set)
                    swapped += 1
    return swapped


def _checkpointed(forward):
    def run(args, kwargs):
        return forward(*args, **kwargs)

    def checkpointed(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(run, args, kwargs, use_reentrant=False)

    return checkpointed


def normal_tensor(t: Tensor) -> Tensor:
    """A copy usable by autograd (LATENT / CONDITIONING made under ComfyUI's inference mode are not)."""
    with torch.inference_mode(False):
        return t.detach().clone()


def noise_schedule_of(model_sampling: Any) -> NoiseSchedule:
    """The `NoiseSchedule` of a ComfyUI ``model_sampling`` object (see the module docstring for what is read)."""
    import comfy.model_sampling as ms

    kind = type(model_sampling)
    name = kind.__name__
    if issubclass(kind, ms.CONST) and isinstance(model_sampling, ms.ModelSamplingDiscreteFlow):
        multiplier = float(model_sampling.multiplier)
        if multiplier != round(multiplier) or multiplier < 1:
            raise LoraValueError(f"flow model sampling with timestep multiplier {multiplier} is not supported")
        return NoiseSchedule("flow", int(multiplier), flow_shift=float(model_sampling.shift))
    if isinstance(model_sampling, ms.ModelSamplingDiscrete) and issubclass(kind, ms.EPS) \
            and not issubclass(kind, ms.CONST):
        prediction = "v_prediction" if issubclass(kind, ms.V_PREDICTION) else "epsilon"
        if issubclass(kind, ms.V_PREDICTION) and kind.calculate_denoised is not ms.V_PREDICTION.calculate_denoised:
            raise LoraValueError(f"model sampling {name} is not plain v-prediction")
        if not issubclass(kind, ms.V_PREDICTION) and kind.calculate_denoised is not ms.EPS.calculate_denoised:
            raise LoraValueError(f"model sampling {name} is not plain ε-prediction")
        sigmas = model_sampling.sigmas.detach().double().cpu()  # (T,)
        alphas_cumprod = (1.0 / (1.0 + sigmas**2)).float()
        return NoiseSchedule(prediction, len(alphas_cumprod), alphas_cumprod)
    bases = ", ".join(b.__name__ for b in kind.__mro__[1:4])
    raise LoraValueError(f"cannot train with this model's sampling ({name}: {bases})",
                         hint="supported: discrete ε / v-prediction and discrete flow (e.g. ModelSamplingSD3)")


class ComfyBackend:
    """Train on a ComfyUI MODEL (ModelPatcher); CLIP and VAE are needed only for captions and images."""

    def __init__(self, model: Any, *, clip: Any = None, vae: Any = None, model_name: str | None = None):
        if not comfy_host.is_model_patcher(model):
            raise LoraValueError(f"expected a ComfyUI MODEL, got {type(model).__name__}")
        self.patcher = model
        self.base = model.model
        kind = type(self.base).__name__
        if kind not in CONTEXT_ONLY_MODELS + SDXL_MODELS:
            raise LoraValueError(f"training on {kind} models is not supported yet",
                                 hint="LoRA Ops trains SD 1.x / 2.x and SDXL MODELs in ComfyUI")
        self.sdxl = kind in SDXL_MODELS
        self.clip = clip
        self.vae = vae
        self.family = "sdxl" if self.sdxl else "sd1"  # the model class, checked above, says which
        self.model_name = model_name
        self._keys = {path[len("unet."):]: path for path in comfy_host.unet_targets(model)}

    def load(self) -> None:
        """Load the patcher fully on its device (applies upstream patches) and make its weights trainable."""
        import comfy.model_management

        with torch.inference_mode(False):
            comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        swapped = make_trainable(self.base.diffusion_model)
        if swapped:
            log.info("made %d inference-mode tensors of the denoiser trainable (values unchanged)", swapped)

    # ---------------------------------------------------------------------------------------------- modules
    def denoiser(self) -> nn.Module:
        return self.base.diffusion_model

    def text_encoders(self) -> dict[str, nn.Module]:
        return {}  # text-encoder LoRA is trained through the diffusers backend (`lora-ops train`) for now

    def layer_keys(self, part: str) -> dict[str, str]:
        if part != "unet":
            raise LoraValueError(f"this MODEL has no part '{part}' to train", hint="train the UNet only")
        unet = self.denoiser()
        return {path: "unet." + path for path in self._keys if isinstance(unet.get_submodule(path), nn.Linear |
                                                                           nn.Conv2d)}

    @property
    def device(self) -> torch.device:
        return next(self.denoiser().parameters()).device

    def to(self, device: torch.device) -> None:
        if torch.device(device) != self.device:
            raise LoraValueError(f"the MODEL is on {self.device}; ComfyUI decides where it lives",
                                 hint="train with device='model'")

    def _blocks(self) -> list[nn.Module]:
        """The UNet's residual / transformer blocks: what gradient checkpointing recomputes one at a time."""
        unet = self.denoiser()
        return [child for block in (*unet.input_blocks, unet.middle_block, *unet.output_blocks)
                for child in block.children()]

    def set_gradient_checkpointing(self, enabled: bool, *, text_encoders: bool = False) -> None:
        """Recompute each UNet block's activations in the backward pass instead of keeping them (as ComfyUI's own
        trainer does): an instance-level ``forward`` wrapper, removed again when disabled."""
        for block in self._blocks():
            if enabled and "forward" not in vars(block):
                block.forward = _checkpointed(block.forward)
            elif not enabled and "forward" in vars(block):
                del block.forward

    # ----------------------------------------------------------------------------------------------- math
    def noise_schedule(self) -> NoiseSchedule:
        return noise_schedule_of(self.patcher.get_model_object("model_sampling"))

    def process_latents(self, samples: Tensor) -> Tensor:
        """A LATENT's ``samples`` (the VAE's raw output) → the denoiser's latent space (``process_latent_in``)."""
        return self.base.process_latent_in(normal_tensor(samples).float())

    def encode_images(self, pixels: Tensor) -> Tensor:
        if self.vae is None:
            raise LoraValueError("training from images needs a VAE", hint="connect the VAE input, or give LATENT")
        images = ((pixels.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)  # ComfyUI IMAGE (B, H, W, 3) in [0, 1]
        return self.process_latents(self.vae.encode(images)).to(pixels.device)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        if self.clip is None:
            raise LoraValueError("captions need a CLIP to encode them",
                                 hint="connect the CLIP input (also needed for caption dropout)")
        rows = []
        for text in prompts:
            cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
            rows.append(self.conditioning([[cond, {"pooled_output": pooled}]])[0])  # context (77·k, D)
        if len({r["context"].shape for r in rows}) > 1:
            raise LoraValueError("captions encode to different lengths (over 77 tokens)",
                                 hint="shorten the longest captions, or use batch size 1")
        return {k: torch.stack([r[k] for r in rows]).to(self.device) for k in rows[0]}

    def conditioning(self, conditioning: Sequence[Any]) -> list[dict[str, Tensor]]:
        """ComfyUI CONDITIONING ``[[context (b, n, D), {"pooled_output": (b, P), …}], …]`` → one dict per sample:
        ``context`` (n, D), and for SDXL ``pooled`` (P,)."""
        out = []
        for i, entry in enumerate(conditioning):
            if not (isinstance(entry, list | tuple) and entry and isinstance(entry[0], Tensor) and entry[0].ndim == 3):
                raise LoraValueError(f"CONDITIONING entry {i} is not a [tensor (batch, tokens, dim), options] pair")
            extra = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            ignored = sorted(k for k in extra if k != "pooled_output")
            if ignored:
                log.warning("CONDITIONING entry %d: options %s are not used in training", i, ", ".join(ignored))
            pooled = extra.get("pooled_output")
            if self.sdxl and not (isinstance(pooled, Tensor) and pooled.ndim == 2 and len(pooled) == len(entry[0])):
                raise LoraValueError(f"CONDITIONING entry {i} has no pooled_output, which SDXL needs",
                                     hint="encode the prompt with an SDXL CLIP (CLIPTextEncode)")
            for j, context in enumerate(entry[0]):
                row = {"context": normal_tensor(context)}
                if self.sdxl:
                    row["pooled"] = normal_tensor(pooled[j])
                out.append(row)
        return out

    def _adm(self, pooled: Tensor, micro: Tensor) -> Tensor:
        """SDXL's ``y`` (B, adm) from ComfyUI's own ``encode_adm``, one sample at a time (sizes may differ)."""
        rows = []
        for p, (oh, ow, top, left, th, tw) in zip(pooled, micro.tolist()):
            rows.append(self.base.encode_adm(pooled_output=p[None].float().cpu(), width=ow, height=oh, crop_w=left,
                                             crop_h=top, target_width=tw, target_height=th))
        return torch.cat(rows)

    def predict(self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Conditioning, micro: Tensor
                ) -> Tensor:
        dtype = next(iter(denoiser.parameters())).dtype
        if self.base.manual_cast_dtype is not None:
            dtype = self.base.manual_cast_dtype
        context = cond["context"].to(self.device, dtype)
        extra = {"y": self._adm(cond["pooled"], micro).to(self.device, dtype)} if self.sdxl else {}
        return denoiser(noisy.to(dtype), timesteps.float(), context=context, transformer_options={}, **extra)

    def describe(self) -> Mapping[str, str]:
        config = getattr(self.base, "model_config", None)
        out = {"ss_sd_model_name": self.model_name or (type(config).__name__ if config is not None else "MODEL")}
        out["ss_base_model_version"] = families.get(self.family).ss_base_model_version
        return out

