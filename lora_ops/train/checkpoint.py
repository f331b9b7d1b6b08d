"""Resumable training checkpoints: tensors in safetensors, everything else in JSON. No pickles.

A checkpoint is a folder ``checkpoint-000050``::

    state.safetensors   the trainable LoRA tensors (stable names), AdamW's state tensors, RNG states (uint8)
    state.json          step, settings, optimizer param groups, LR-scheduler state, Python/NumPy RNG, loss history
    lora.safetensors    the adapter at this step in the chosen file format, with metadata (usable as a LoRA)

It is written into a hidden temp folder beside the target and renamed into place, so a crash or a cancel during the
write never leaves a half checkpoint under the final name. Floats go through JSON with Python's round-trip
``repr``, tensors through safetensors bit for bit, so a resumed run continues bit-identically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import atomic, io
from ..errors import LoraFileError

log = logging.getLogger(__name__)

FORMAT = "lora-ops-train-checkpoint"
VERSION = 1
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
LORA_FILE = "lora.safetensors"
NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, loaded back."""

    path: Path
    step: int
    info: dict[str, Any]  # the JSON part
    adapter: dict[str, torch.Tensor]  # trainable tensors by stable name
    optimizer: dict[str, Any]  # a torch optimizer state_dict
    rng: dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


# ------------------------------------------------------------------------------------------------- RNG states


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Global RNG states: torch (CPU, CUDA) as tensors; Python and NumPy as JSON."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = state
    version, internal, gauss = random.getstate()
    info: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        info["numpy"] = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    except ImportError:  # numpy is a dependency, but RNG restore must never be the reason a resume fails
        pass
    return tensors, info


def restore_rng(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
    if "rng/torch" in tensors:
        torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):  # a different GPU count: the CUDA RNG is not used for the math
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    if "python" in info:
        version, internal, gauss = info["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in info:
        import numpy as np

        kind, keys, pos, has_gauss, cached = info["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# -------------------------------------------------------------------------------------------- optimizer state


def _split_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in info.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = [dict(g) for g in info["param_groups"]]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


# ------------------------------------------------------------------------------------------------ save / load


def save_checkpoint(
    folder: Path,
    *,
    step: int,
    adapter: Mapping[str, torch.Tensor],
    optimizer: Mapping[str, Any],
    info: Mapping[str, Any],
    lora_file: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None,
) -> Path:
    """Write one checkpoint folder atomically (`lora_ops.atomic`: temp folder, fsync, rename); returns its path."""
    folder = Path(folder)
    opt_tensors, opt_info = _split_optimizer(optimizer)
    rng_tensors, rng_info = capture_rng()
    tensors = {**{f"adapter/{k}": v for k, v in adapter.items()}, **opt_tensors, **rng_tensors}
    payload = {"format": FORMAT, "version": VERSION, "step": step, **info, "optimizer": opt_info, "rng": rng_info}
    with atomic.atomic_write(folder, folder=True) as tmp:  # the whole folder appears at once, or not at all
        io.save_state_dict(tmp / STATE_TENSORS, tensors, {"format": FORMAT})
        if lora_file is not None:
            io.save_state_dict(tmp / LORA_FILE, *lora_file)
        (tmp / STATE_JSON).write_text(json.dumps(payload, indent=1, sort_keys=True), encoding="utf-8")
    log.info("saved checkpoint %s", folder)
    return folder


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or the newest ``checkpoint-N`` inside a folder of them."""
    path = Path(path)
    if (path / STATE_JSON).is_file():
        return path
    if path.is_dir():
        found = sorted(
            (int(m.group(1)), p) for p in path.iterdir() if (m := NAME.match(p.name)) and (p / STATE_JSON).is_file()
        )
        if found:
            return found[-1][1]
    raise LoraFileError("no training checkpoint here", file=path, hint=f"expected {STATE_JSON} or checkpoint-N folders")


def load_checkpoint(path: str | Path) -> Checkpoint:
    folder = find_checkpoint(path)
    try:
        info = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise LoraFileError(f"unreadable checkpoint state ({err})", file=folder / STATE_JSON) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise LoraFileError("not a LoRA Ops training checkpoint", file=folder / STATE_JSON)
    if info.get("version") != VERSION:
        raise LoraFileError(f"checkpoint version {info.get('version')} is not supported", file=folder)
    tensors, _meta = io.load_state_dict(folder / STATE_TENSORS)
    adapter = {k.removeprefix("adapter/"): v for k, v in tensors.items() if k.startswith("adapter/")}
    optimizer = _join_optimizer(tensors, info["optimizer"])
    rng = {"tensors": {k: v for k, v in tensors.items() if k.startswith("rng/")}, "info": info.get("rng", {})}
    return Checkpoint(folder, int(info["step"]), info, adapter, optimizer, rng)


def prune_checkpoints(folder: Path, keep: int | None) -> None:
    """Delete all but the newest ``keep`` checkpoint folders."""
    if keep is None or not folder.is_dir():
        return
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := NAME.match(p.name)))
    for _step, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed old checkpoint %s", path)
