"""Trainable LoRA on the host's modules: PEFT injection, the trainable parameters by stable name, and back out.

Injection uses PEFT's `LoraModel` with the diffusers recipe's `LoraConfig` (``init_lora_weights="gaussian"``: A
drawn from N(0, 1/r), B zero, so the adapted model starts exactly at the base model). Targets are resolved by us on
canonical keys and handed to PEFT as exact module paths, so presets mean the same layers on every host. The draw of
A is seeded (the caller's RNG is left as it was). `remove` unloads PEFT's wrappers and restores every parameter's
``requires_grad`` and every module's train/eval mode: the host's model is as it was before training.

Trainable parameters are named ``<part>/<module path>/A`` and ``…/B``; those names key the optimizer order and the
checkpoint, independent of PEFT's internal naming.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LoraValueError
from ..lora import LoRA, LoRALayer
from .config import TE_PRESETS, UNET_PRESETS, TrainConfig

log = logging.getLogger(__name__)

ADAPTER = "default"


def resolve_targets(
    config: TrainConfig, part: str, module: nn.Module, layer_keys: Mapping[str, str]
) -> dict[str, str]:
    """Module path → canonical key of the layers the settings target in one part ("unet", "te1", …)."""
    text = part != "unet"
    kinds = (nn.Linear,) if text else (nn.Linear, nn.Conv2d)

    def is_kind(path: str, kind: tuple[type, ...]) -> bool:
        return isinstance(module.get_submodule(path), kind)

    if config.targets == "custom":
        pattern = re.compile(config.target_pattern or "")
        chosen = {p: k for p, k in layer_keys.items() if pattern.search(k) and is_kind(p, kinds)}
    elif config.targets == "all-linear":
        chosen = {p: k for p, k in layer_keys.items() if is_kind(p, (nn.Linear,))}
    else:
        suffixes = (TE_PRESETS if text else UNET_PRESETS)[config.targets]
        chosen = {
            p: k for p, k in layer_keys.items() if k.endswith(tuple("." + s for s in suffixes)) and is_kind(p, kinds)
        }
    if text and config.targets in ("all-linear", "custom"):
        chosen = {p: k for p, k in chosen.items() if "text_projection" not in k}
    return dict(sorted(chosen.items()))


@dataclass
class _Saved:
    requires_grad: dict[str, bool]
    training: dict[str, bool]


class TrainableLora:
    """LoRA injected into the host's modules for training; a context that takes itself out again."""

    def __init__(self, config: TrainConfig, parts: Mapping[str, tuple[nn.Module, Mapping[str, str]]], *, seed: int):
        """``parts``: part → (module, {module path: canonical key}) of the layers to train (from `resolve_targets`)."""
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        self.config = config
        self.modules = {part: m for part, (m, _) in parts.items()}
        self.keys = {part: dict(keys) for part, (_, keys) in parts.items()}
        self._saved = {
            part: _Saved(
                {n: p.requires_grad for n, p in m.named_parameters()},
                {n: sub.training for n, sub in m.named_modules()},
            )
            for part, m in self.modules.items()
        }
        self._tuners: dict[str, object] = {}
        self._mode: bool | None = None
        try:
            with torch.random.fork_rng(devices=[]):
                for i, (part, module) in enumerate(self.modules.items()):
                    torch.manual_seed(seed * 1000 + i)  # A's gaussian draw; B is zero
                    lora_config = LoraConfig(
                        r=config.rank,
                        lora_alpha=config.network_alpha,
                        use_rslora=config.rslora,
                        init_lora_weights="gaussian",
                        target_modules=list(self.keys[part]),
                        lora_dropout=0.0,
                        bias="none",
                    )
                    self._tuners[part] = LoraModel(module, lora_config, ADAPTER)
        except Exception:
            self.remove()
            raise
        self.params = self._collect()
        for p in self.params.values():  # master weights in fp32 whatever the frozen model's dtype
            p.data = p.data.float()
            p.requires_grad_(True)

    def _collect(self) -> dict[str, nn.Parameter]:
        out: dict[str, nn.Parameter] = {}
        for part, module in self.modules.items():
            for path in self.keys[part]:
                layer = module.get_submodule(path)
                out[f"{part}/{path}/A"] = layer.lora_A[ADAPTER].weight
                out[f"{part}/{path}/B"] = layer.lora_B[ADAPTER].weight
        return out

    def param_groups(self, unet_lr: float, text_lr: float) -> list[dict]:
        groups = []
        for part in self.modules:
            params = [p for name, p in self.params.items() if name.split("/", 1)[0] == part]
            groups.append({"params": params, "lr": unet_lr if part == "unet" else text_lr, "name": part})
        return groups

    def state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by stable name (fp32 CPU copies) — what a checkpoint stores."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self.params.items()}

    def load_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(set(self.params) - set(tensors))
        extra = sorted(set(tensors) - set(self.params))
        if missing or extra:
            raise LoraValueError(
                f"checkpoint does not fit this adapter ({len(missing)} missing, {len(extra)} unexpected tensors)",
                key=(missing or extra)[0],
            )
        with torch.no_grad():
            for name, p in self.params.items():
                if tuple(tensors[name].shape) != tuple(p.shape):
                    raise LoraValueError(f"checkpoint tensor has shape {tuple(tensors[name].shape)}", key=name)
                p.copy_(tensors[name])

    def to_lora(self, family: str | None, metadata: Mapping[str, str], dtype: torch.dtype = torch.float32) -> LoRA:
        """The trained adapter as a `LoRA` value on canonical keys (ΔW = alpha/r · B·A, as PEFT computed it)."""
        alpha = self.config.effective_alpha
        layers = {}
        for part in self.modules:
            for path, key in self.keys[part].items():
                down = self.params[f"{part}/{path}/A"].detach().to("cpu", dtype, copy=True)  # (r, in[, kh, kw])
                up = self.params[f"{part}/{path}/B"].detach().to("cpu", dtype, copy=True)  # (out, r[, 1, 1])
                layers[key] = LoRALayer(down=down, up=up, alpha=alpha)
        return LoRA(layers, dict(metadata), family=family, source_format=None)

    def set_train(self, training: bool) -> None:
        """Train/eval mode of the adapted modules (walks the module tree only when the mode changes)."""
        if self._mode is training:
            return
        for module in self.modules.values():
            module.train(training)
        self._mode = training

    def remove(self) -> None:
        """Take PEFT's wrappers out and restore requires_grad and train/eval modes exactly."""
        for tuner in self._tuners.values():
            tuner.unload()
        self._tuners.clear()
        for part, module in self.modules.items():
            saved = self._saved[part]
            for name, p in module.named_parameters():
                if name in saved.requires_grad:
                    p.requires_grad_(saved.requires_grad[name])
            for name, sub in module.named_modules():
                if name in saved.training:
                    sub.training = saved.training[name]


def scale_of(config: TrainConfig) -> float:
    """PEFT's scaling for these settings: alpha/r, or alpha/√r with rsLoRA."""
    return config.network_alpha / (math.sqrt(config.rank) if config.rslora else config.rank)
