"""``lora-ops train`` / ``python -m lora_ops.train``: the training loop from the command line.

Every `TrainConfig` field is a flag (``--rank 8``, ``--learning-rate 1e-4``, ``--gradient-checkpointing`` /
``--no-gradient-checkpointing``); ``--config FILE.json`` gives a base that flags override. Data-parallel training
is ``accelerate launch --num_processes N -m lora_ops.train …`` (add ``--multi_gpu`` on a CPU-only machine to get
N processes; with ``--device cpu`` they talk over gloo).

Wiring into ``lora_ops.cli``::

    p = sub.add_parser("train", help="train a LoRA on captioned images")
    add_train_arguments(p)
    p.set_defaults(func=train_from_args)
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path

from ..errors import LoraFileError, LoraOpsError, LoraValueError
from .config import DEVICES, DTYPES, LR_SCHEDULES, ON_BAD_DATA, SAVE_FORMATS, TARGETS, TrainConfig

log = logging.getLogger(__name__)

CHOICES = {
    "targets": TARGETS,
    "lr_scheduler": LR_SCHEDULES,
    "dtype": DTYPES,
    "save_dtype": DTYPES,
    "on_bad_data": ON_BAD_DATA,
    "save_format": SAVE_FORMATS,
    "device": DEVICES,
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parser_type(annotation: str):
    kind = annotation.replace(" ", "").split("|")[0]
    return {"int": int, "float": float}.get(kind, str)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Add the ``train`` arguments: DATA, the model, --config/--resume, and one flag per `TrainConfig` field."""
    p.add_argument("data", help="folder of images with same-name .txt captions (N_name sub-folders repeat N times)")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--model", help="a local diffusers pipeline folder (SD 1.x or SDXL); nothing is downloaded")
    model.add_argument("--tiny", choices=("sd1", "sdxl"), help="the built-in tiny random-weight model (demos, tests)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also load a --model folder whose weights are pickled .bin/.pt files (with torch "
                        "weights_only=True); pickles can run code")
    p.add_argument("--config", help="JSON file of training settings; the flags below override it")
    p.add_argument("--resume", help="a checkpoint folder, or a <name>-checkpoints folder (its newest checkpoint)")
    p.add_argument("-o", "--output-dir", dest="output_dir", help="where the LoRA, loss JSON/PNG and checkpoints go")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    settings = p.add_argument_group("training settings (see TrainConfig)")
    for f in fields(TrainConfig):
        if f.name == "output_dir":
            continue
        default = f.default if f.default is not MISSING else None
        help_text = f"default: {default}"
        if "bool" in str(f.type):
            settings.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                  default=argparse.SUPPRESS, help=help_text)
        else:
            settings.add_argument(_flag(f.name), dest=f.name, type=_parser_type(str(f.type)),
                                  choices=CHOICES.get(f.name), default=argparse.SUPPRESS, help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    base = TrainConfig.from_json(args.config).to_dict() if getattr(args, "config", None) else {}
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    given = {k: v for k, v in given.items() if v is not None or k != "output_dir"}
    if given.get("epochs") is not None and "max_steps" not in given:
        given["max_steps"] = None
    return TrainConfig.from_dict({**base, **given})


def _backend(args: argparse.Namespace):
    from .diffusers_backend import DiffusersBackend

    if args.tiny:
        from ..testing import tiny

        pipe = tiny.tiny_sd1_pipeline() if args.tiny == "sd1" else tiny.tiny_sdxl_pipeline()
        return DiffusersBackend(pipe, model_name=f"tiny-{args.tiny} (random weights)")
    return DiffusersBackend.from_pretrained(args.model, allow_pickle=getattr(args, "allow_pickle", False))


def _check_output_dir(folder: str) -> None:
    """The output folder may be created, but not its parents: a typo must not scatter a run's files elsewhere."""
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise LoraFileError("-o/--output-dir: not a folder", file=folder, hint="give a folder for the run's files")
    if not path.exists() and not path.parent.is_dir():
        raise LoraFileError(f"-o/--output-dir: the folder {path.parent} does not exist", file=folder,
                            hint="create it first, or choose another output folder")


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def train_from_args(args: argparse.Namespace) -> int:
    """Run ``train`` for parsed arguments; 0 when completed, 130 when cancelled (a checkpoint was written)."""
    from .loop import train

    config = config_from_args(args)
    if config.output_dir is None:
        raise LoraValueError("no output folder", hint="give -o/--output-dir")
    _check_output_dir(config.output_dir)
    result = train(config, _backend(args), args.data, resume_from=args.resume, show_progress=not args.quiet)
    if not result.main_process:
        return 0 if result.status == "completed" else 130
    report = result.report
    if report.skipped:
        _out(f"left out {len(report.skipped)} file(s):")
        for path, why in report.skipped:
            _out(f"  {path}: {why}")
    if result.status != "completed":
        where = f"; resume with --resume {result.checkpoint}" if result.checkpoint else ""
        _out(f"stopped at step {result.step}/{result.total_steps}{where}")
        return 130
    last = result.history.loss[-1] if result.history.loss else float("nan")
    evals = result.history.eval_loss
    change = f", eval loss {evals[0]:.4f} → {evals[-1]:.4f}" if len(evals) > 1 else ""
    _out(f"wrote {result.output} ({len(result.lora.layers)} layers, {result.step} steps, loss {last:.4f}{change})")
    _out(f"loss history {result.history_file}, plot {result.plot_file}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-ops train", description="train a LoRA on captioned images")
    add_train_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return train_from_args(args)
    except LoraOpsError as err:
        from ..cli import one_line

        sys.stderr.write(f"lora-ops train: error: {one_line(err)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("lora-ops train: interrupted\n")
        return 130
