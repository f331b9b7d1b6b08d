"""`lora-ops …`: the library's operations from the command line.

Every command is a small function taking parsed arguments; errors from the library (`LoraOpsError`) become one
readable line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from .errors import LoraOpsError

Command = Callable[[argparse.Namespace], int]


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .files import load_lora
    from .inspect import format_report, inspect_lora

    lora = load_lora(args.file, family=args.family, allow_pickle=args.allow_pickle, strict=not args.lenient)
    report = inspect_lora(lora, args.file)
    _out(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["non_finite_layers"] else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .files import load_lora, save_lora

    lora = load_lora(args.input, family=args.family, allow_pickle=args.allow_pickle, strict=not args.lenient)
    options = {"component": args.component} if args.to == "peft" and args.component else {}
    path = save_lora(lora, args.output, args.to, overwrite=args.overwrite, **options)
    _out(f"wrote {path} ({args.to}, {len(lora.layers)} layers, from {lora.source_format})")
    return 0


def parse_weighted(spec: str, *, texts: bool = True) -> tuple[str, float, float]:
    """``FILE[:w[:w_text]]`` → (file, w, w_text); a colon not followed by a number stays part of the path."""
    parts = spec.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < (2 if texts else 1):
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    weight = numbers[0] if numbers else 1.0
    return ":".join(parts), weight, numbers[1] if len(numbers) > 1 else weight


def _load_weighted(args: argparse.Namespace) -> list:
    """The ``FILE[:w[:w_text]]`` arguments as (LoRA, w, w_text) items."""
    from .files import load_lora

    items = []
    for spec in args.loras:
        path, w, wt = parse_weighted(spec)
        lora = load_lora(path, family=args.family, allow_pickle=args.allow_pickle, strict=not args.lenient)
        items.append((lora, w, wt))
    return items


def cmd_bake(args: argparse.Namespace) -> int:
    from .bake import bake

    report = bake(args.checkpoint, _load_weighted(args), args.output, dtype=args.dtype, overwrite=args.overwrite,
                  progress=not args.quiet, strict=not args.partial, family=args.family)
    _out(report.summary())
    return 0


def _rule_from_args(args: argparse.Namespace):
    from .rank_rules import make_rule

    chosen = [(name, getattr(args, name)) for name in ("rank", "sv_ratio", "sv_fro", "sv_cumulative", "size_mb")
              if getattr(args, name) is not None]
    if not chosen:
        return None
    name, value = chosen[0]
    return make_rule("fixed" if name == "rank" else name, value, max_rank=args.max_rank)


def _output_format(args: argparse.Namespace, lora) -> str:
    from .formats import WRITABLE

    if args.to:
        return args.to
    return lora.source_format if lora.source_format in WRITABLE and lora.source_format != "peft" else "kohya"


def _write_report(args: argparse.Namespace, report) -> None:
    if args.report:
        from pathlib import Path

        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2))
    if args.plot:
        from .plots import spectrum_plot

        spectrum_plot(report, args.plot)


def cmd_resize(args: argparse.Namespace) -> int:
    from .files import load_lora, save_lora
    from .rank_rules import make_rule
    from .resize import resize

    lora = load_lora(args.input, family=args.family, allow_pickle=args.allow_pickle, strict=not args.lenient)
    conv_rule = make_rule("fixed", args.conv_rank) if args.conv_rank else None
    out, report = resize(lora, _rule_from_args(args), conv_rule=conv_rule, progress=not args.quiet)
    path = save_lora(out, args.output, _output_format(args, lora), overwrite=args.overwrite)
    _write_report(args, report)
    _out(f"{report.summary()}\nwrote {path}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .combine import combine
    from .files import save_lora

    items = _load_weighted(args)
    out, report = combine(items, args.method, _rule_from_args(args), seed=args.seed, density=args.density,
                          progress=not args.quiet)
    path = save_lora(out, args.output, _output_format(args, items[0][0]), overwrite=args.overwrite)
    _write_report(args, report)
    _out(f"{report.summary()}\nwrote {path}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from .extract import extract
    from .files import save_lora
    from .rank_rules import make_rule

    conv_rule = make_rule("fixed", args.conv_rank) if args.conv_rank else None
    lora, report = extract(args.base, args.tuned, _rule_from_args(args), conv_rule=conv_rule, family=args.family,
                           progress=not args.quiet)
    path = save_lora(lora, args.output, args.to or "kohya", overwrite=args.overwrite)
    _write_report(args, report)
    _out(f"{report.summary()}\nwrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    steps = {} if args.steps is None else {"train_steps": args.steps}
    return run_demo(out_dir=args.out, progress=not args.quiet, echo=_out, **steps)


def _add_load_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", choices=["sd1", "sdxl"], help="model family, when the keys do not tell")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read legacy .pt/.ckpt/.bin files (with torch weights_only=True); pickles can run code")
    p.add_argument("--lenient", action="store_true", help="load the layers that are understood and list the rest")


def build_parser() -> argparse.ArgumentParser:
    from .formats import WRITABLE

    parser = argparse.ArgumentParser(prog="lora-ops", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (default: torch's choice; 1 is often fastest for small models on "
                             "shared cores)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("inspect", help="show what a LoRA file holds (format, family, ranks, metadata, NaN/Inf)")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_load_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="rewrite a LoRA file in another format")
    p.add_argument("input")
    p.add_argument("--to", required=True, choices=WRITABLE)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--component", choices=["unet", "text_encoder", "text_encoder_2"],
                   help="with --to peft: which model to write (a PEFT file holds one)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    _add_load_options(p)
    p.set_defaults(func=cmd_convert)

    def rank_options(p: argparse.ArgumentParser, required: bool) -> None:
        group = p.add_mutually_exclusive_group(required=required)
        group.add_argument("--rank", type=int, help="fixed rank (clamped to what a layer has)")
        group.add_argument("--sv-ratio", type=float, help="keep singular values above σ₀ / X")
        group.add_argument("--sv-fro", type=float, help="keep the fraction X of the Frobenius energy (Σσ²)")
        group.add_argument("--sv-cumulative", type=float, help="keep the fraction X of Σσ")
        group.add_argument("--size-mb", type=float, help="fit the whole file into X MB")
        p.add_argument("--max-rank", type=int, help="cap for the dynamic rules")
        p.add_argument("--report", help="write the per-layer report as JSON")
        p.add_argument("--plot", help="write the singular-value spectrum as PNG")
        p.add_argument("--to", choices=WRITABLE, help="output format (default: the input's, or kohya)")
        p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        _add_load_options(p)

    p = sub.add_parser("resize", help="shrink a LoRA to a fixed or dynamic rank by exact low-rank SVD")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--conv-rank", type=int, help="fixed rank for conv layers with kernels larger than 1×1")
    rank_options(p, required=True)
    p.set_defaults(func=cmd_resize)

    p = sub.add_parser("merge", help="combine several LoRAs into one (concat, svd, linear, ties, dare)")
    p.add_argument("loras", nargs="+", metavar="LORA[:w[:w_text]]")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--method", default="concat",
                   choices=["concat", "svd", "linear", "ties", "dare_linear", "dare_ties"],
                   help="concat is exact (rank = sum of ranks); svd is exact then truncated by the rank rule")
    p.add_argument("--density", type=float, default=0.5, help="ties/dare: fraction of entries kept")
    p.add_argument("--seed", type=int, default=0, help="dare: random seed (deterministic)")
    rank_options(p, required=False)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("extract", help="extract a LoRA from a base and a tuned checkpoint (file or diffusers folder)")
    p.add_argument("base")
    p.add_argument("tuned")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--conv-rank", type=int, help="fixed rank for conv layers with kernels larger than 1×1")
    rank_options(p, required=True)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("bake", help="bake LoRAs into a checkpoint file or diffusers folder (streamed, atomic)")
    p.add_argument("checkpoint", help="single-file .safetensors checkpoint (LDM names) or a diffusers folder")
    p.add_argument("loras", nargs="+", metavar="LORA[:w[:w_text]]",
                   help="LoRA files with model strength and text-encoder strength (default 1)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--dtype", choices=["keep", "fp16", "bf16", "fp32"], default="keep",
                   help="output dtype of floating tensors (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never the input)")
    p.add_argument("--partial", action="store_true", help="bake the layers that match and report the rest")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_load_options(p)
    p.set_defaults(func=cmd_bake)

    from .train.cli import add_train_arguments, train_from_args

    p = sub.add_parser("train", help="train a LoRA on a folder of captioned images (diffusers model folder)")
    add_train_arguments(p)
    p.set_defaults(func=train_from_args)

    p = sub.add_parser("demo", help="run the whole LoRA life cycle on the embedded tiny SD1.5-shaped model")
    p.add_argument("--out", default="lora-ops-demo", help="folder for the demo's files (report.html, PNGs, files)")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help="training steps for the demo LoRA (default: enough for the visual checks to pass)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    if args.threads is not None:
        if args.threads < 1:
            sys.stderr.write(f"lora-ops: error: --threads must be at least 1, got {args.threads}\n")
            return 2
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except LoraOpsError as err:
        sys.stderr.write(f"lora-ops {args.command}: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"lora-ops {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
