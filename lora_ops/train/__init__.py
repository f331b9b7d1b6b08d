"""Train a LoRA on the host's model from captioned images: `train(config, backend, data) -> TrainResult`.

- `TrainConfig` (config): every setting, with the diffusers recipe's defaults.
- `Dataset` (data): a kohya-style folder (``Dataset.from_folder``) or in-memory images (``Dataset.from_images``).
- `TrainingBackend` (backend): what a host supplies; `DiffusersBackend` (diffusers_backend) for SD 1.x / SDXL.
- `train` / `Trainer` (loop): the host-agnostic loop under Accelerate, with progress, cancel, checkpoints, resume.
- `cli`: ``add_train_arguments(parser)`` and ``train_from_args(args)`` for ``lora-ops train``.

Heavy imports (diffusers, peft, accelerate) happen when training starts, not on import.
"""

from .backend import TrainingBackend
from .checkpoint import find_checkpoint, load_checkpoint
from .config import TrainConfig
from .data import DataReport, Dataset, scan_folder
from .loop import LossHistory, Trainer, TrainResult, train
from .schedule import NoiseSchedule

__all__ = [
    "DataReport",
    "Dataset",
    "LossHistory",
    "NoiseSchedule",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainingBackend",
    "find_checkpoint",
    "load_checkpoint",
    "scan_folder",
    "train",
]
