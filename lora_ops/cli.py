"""`lora-ops …`: the library's operations from the command line.

Every command is a small function taking parsed arguments; errors from the library (`LoraOpsError`) become one
readable line on stderr and exit code 2, never a traceback. The library's hints speak API (``pass
overwrite=True``); `CLI_WORDING` turns them into this command line's flags before they are printed.

Arguments are checked before any work: ``FILE[:w[:w_text]]`` strengths must be finite numbers within
±`MAX_STRENGTH`; an output file must end in ``.safetensors``, its folder must exist (nothing creates it), and it
must not be one of the command's inputs (any spelling: relative, symlink, hard link), even with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from . import families
from .errors import LoraFileError, LoraOpsError, LoraValueError, reword
from .lora import MAX_STRENGTH

Command = Callable[[argparse.Namespace], int]

CLI_WORDING = (
    (r"\boverwrite=True(?: / --overwrite)?", "--overwrite"),
    (r"\bstrict=False(?= to bake)", "--partial"),
    (r"\bstrict=False(?: / --lenient)?", "--lenient"),
    (r"\ballow_pickle=True(?: / --allow-pickle)?", "--allow-pickle"),
    (r"\bcomponent=…(?: / --component)?", "--component"),
    (r"\bpass family=(?:'sd1' or 'sdxl')?", "pass --family (" + ", ".join(families.IDS) + ")"),
    (r"a per-layer rule \(fixed, sv_ratio, sv_fro, sv_cumulative\), then resize to size_mb",
     "--rank, --sv-ratio, --sv-fro or --sv-cumulative, then resize --size-mb"),
    (r"the JSON report lists all", "--json lists all"),
)
"""The library's API wording → this CLI's flags, for error hints and the inspect report (regex, replacement).

The `` / --flag`` tails are what older library messages carried; the table accepts both spellings."""

_PATH_ENDINGS = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _warn(args: argparse.Namespace, text: str) -> None:
    sys.stderr.write(f"lora-ops {args.command}: warning: {text}\n")


# ------------------------------------------------------------------------------------------- argument checks


def _same_file(a: Path, b: Path) -> bool:
    """Whether two spellings name one file: after resolving symlinks and ``..``, or as hard links."""
    try:
        if a.expanduser().resolve() == b.expanduser().resolve():
            return True
    except (OSError, RuntimeError, ValueError):
        return False
    try:
        return os.path.samefile(a.expanduser(), b.expanduser())
    except (OSError, ValueError):
        return False


def _replaces_input(out: Path, src: Path) -> bool:
    """Whether writing ``out`` would replace ``src``, or an existing file inside ``src`` when it is a folder."""
    if _same_file(out, src):
        return True
    if src.is_dir() and out.exists():
        try:
            return out.expanduser().resolve().is_relative_to(src.expanduser().resolve())
        except (OSError, RuntimeError, ValueError):
            return False
    return False


def check_output(output: str, inputs: Iterable[str] = (), *, suffix: str | None = ".safetensors",
                 flag: str = "-o") -> None:
    """Refuse an output path before any work: wrong suffix, missing folder, or one of the inputs."""
    path = Path(output).expanduser()
    if suffix and path.suffix.lower() != suffix:
        raise LoraValueError(f"{flag} must name a {suffix} file", file=output,
                             hint=f"give a file name ending in {suffix}")
    folder = path.parent
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise LoraFileError(f"the {flag} folder {folder} {state}", file=output,
                            hint="create it first, or choose another output path")
    for src in inputs:
        if _replaces_input(path, Path(src)):
            raise LoraFileError(f"{flag} is the input {src}; refusing to replace it", file=output,
                                hint="write to a new file, then replace the original yourself if you want to")


def _check_side_outputs(args: argparse.Namespace, inputs: Sequence[str]) -> None:
    """--report / --plot: their folders exist, and neither is an input, the output or the other."""
    taken = [("-o", args.output)]
    for flag, value, suffix in (("--report", args.report, None), ("--plot", args.plot, ".png")):
        if value:
            check_output(value, inputs, suffix=suffix, flag=flag)
            for other_flag, other in taken:
                if _same_file(Path(value), Path(other)):
                    raise LoraValueError(f"{flag} is the same file as {other_flag}", file=value,
                                         hint="give each output its own file name")
            taken.append((flag, value))


def _strength(text: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LoraValueError(f"strength {text!r} is not a number", file=spec,
                             hint="expected FILE[:w[:w_text]], e.g. style.safetensors:0.8:0.5") from None
    if not math.isfinite(value):
        raise LoraValueError(f"strength {text!r} is not a finite number", file=spec,
                             hint="give a number such as 0.8")
    if abs(value) > MAX_STRENGTH:
        raise LoraValueError(
            f"strength {value:g} is beyond ±{MAX_STRENGTH:g}", file=spec,
            hint=f"a LoRA at {MAX_STRENGTH:g}× its trained strength already gives noise; strengths are usually "
                 "0–2, so this is most likely a typo")
    return value


def parse_weighted(spec: str, *, texts: bool = True) -> tuple[str, float, float]:
    """``FILE[:w[:w_text]]`` → (file, w, w_text), strictly.

    A spec that exists as given is a path (colons allowed). Otherwise, when a prefix exists, everything after it
    must be strengths; when none exists, the trailing numbers are the strengths and a last part that is not a
    number is refused (unless it looks like a path: it holds a slash or ends like a model file, then the whole
    spec is the path and loading reports it missing). Strengths must be finite and within ±`MAX_STRENGTH`.
    """
    most = 2 if texts else 1
    parts = spec.split(":")
    if len(parts) == 1 or Path(spec).exists():
        return spec, 1.0, 1.0
    tail: list[str] = []
    for n in range(1, min(most, len(parts) - 1) + 1):
        if Path(":".join(parts[:-n])).exists():
            tail = parts[-n:]
            break
    else:
        while len(parts) - len(tail) > 1 and len(tail) < most:
            piece = parts[-len(tail) - 1]
            try:
                float(piece)
            except ValueError:
                if tail or "/" in piece or "\\" in piece or piece.lower().endswith(_PATH_ENDINGS):
                    break
                _strength(piece, spec)  # raises, naming the spec and the bad strength
            tail.insert(0, piece)
    path = ":".join(parts[: len(parts) - len(tail)])
    numbers = [_strength(t, spec) for t in tail]
    weight = numbers[0] if numbers else 1.0
    return path, weight, numbers[1] if len(numbers) > 1 else weight


def cmd_inspect(args: argparse.Namespace) -> int:
    from .files import load_lora
    from .inspect import format_report, inspect_lora

    lora = load_lora(args.file, family=args.family, allow_pickle=args.allow_pickle, strict=not args.lenient)
    report = inspect_lora(lora, args.file)
    _out(json.dumps(report, indent=2) if args.json else reword(format_report(report), CLI_WORDING))
    return 1 if report["non_finite_layers"] else 0


def _peft_layers(args: argparse.Namespace, lora) -> list[str]:
    """The layers a PEFT file of ``--component`` gets (a PEFT file holds one model); refuses an empty one."""
    from collections import Counter

    from .formats.diffusers import component_of

    components = {key: component_of(key, lora.family) for key in lora.layers}
    have = Counter(components.values())
    component = args.component or (next(iter(have)) if len(have) == 1 else None)
    if component is None:
        return list(lora.layers)  # several models: write_lora refuses, naming them
    kept = [k for k, c in components.items() if c == component]
    if not kept:
        listing = ", ".join(f"{c}: {n} layers" for c, n in sorted(have.items()))
        raise LoraValueError(f"this LoRA has no {component} layers ({listing}); nothing was written",
                             file=args.input, hint=f"pick --component {' or '.join(sorted(have))}")
    return kept


def cmd_convert(args: argparse.Namespace) -> int:
    from .files import load_lora, save_lora
    from .inspect import non_finite_layers

    if args.component and args.to != "peft":
        raise LoraValueError(f"--component only applies with --to peft (a {args.to} file holds every model)")
    check_output(args.output, [args.input])
    lora = load_lora(args.input, family=args.family, allow_pickle=args.allow_pickle, strict=not args.lenient)
    written = _peft_layers(args, lora) if args.to == "peft" else list(lora.layers)
    options = {"component": args.component} if args.to == "peft" and args.component else {}
    path = save_lora(lora, args.output, args.to, overwrite=args.overwrite, **options)
    bad = sorted(set(non_finite_layers(lora)) & set(written))
    if bad:
        shown = ", ".join(bad[:5]) + (f" … (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        _warn(args, f"{args.input}: NaN/Inf in {len(bad)} layer(s), copied as they are: {shown} "
                    "(lora-ops inspect lists them; such a LoRA breaks every image it is applied to)")
    count = f"{len(written)} layers" if len(written) == len(lora.layers) else (
        f"{len(written)} of {len(lora.layers)} layers: {args.component} only")
    _out(f"wrote {path} ({args.to}, {count}, from {lora.source_format})")
    return 0


def _load_weighted(args: argparse.Namespace) -> list:
    """The ``FILE[:w[:w_text]]`` arguments as (LoRA, w, w_text) items; every spec is parsed before any load."""
    from .files import load_lora

    specs = [parse_weighted(spec) for spec in args.loras]
    items = []
    for path, w, wt in specs:
        lora = load_lora(path, family=args.family, allow_pickle=args.allow_pickle, strict=not args.lenient)
        items.append((lora, w, wt))
    return items


def _lora_paths(args: argparse.Namespace) -> list[str]:
    return [parse_weighted(spec)[0] for spec in args.loras]


def cmd_bake(args: argparse.Namespace) -> int:
    from .bake import bake

    folder = Path(args.checkpoint).is_dir()
    if folder and Path(args.output).suffix.lower() == ".safetensors":
        raise LoraValueError("the checkpoint is a diffusers folder, so the output is a folder too", file=args.output,
                             hint="give a folder name without .safetensors")
    check_output(args.output, [args.checkpoint, *_lora_paths(args)], suffix=None if folder else ".safetensors")
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
    try:
        if args.report:
            Path(args.report).write_text(json.dumps(report.to_dict(), indent=2))
        if args.plot:
            from .plots import spectrum_plot

            spectrum_plot(report, args.plot)
    except OSError as err:
        raise LoraFileError(f"cannot write the report or plot ({err.strerror or err})",
                            file=err.filename or args.report or args.plot) from None


def cmd_resize(args: argparse.Namespace) -> int:
    from .files import load_lora, save_lora
    from .rank_rules import make_rule
    from .resize import resize

    check_output(args.output, [args.input])
    _check_side_outputs(args, [args.input])
    lora = load_lora(args.input, family=args.family, allow_pickle=args.allow_pickle, strict=not args.lenient)
    conv_rule = make_rule("fixed", args.conv_rank) if args.conv_rank else None
    out, report = resize(lora, _rule_from_args(args), conv_rule=conv_rule, progress=not args.quiet)
    path = save_lora(out, args.output, _output_format(args, lora), overwrite=args.overwrite)
    _write_report(args, report)
    _out(f"{report.summary()}\nwrote {path}")
    return 0


def cmd_combine(args: argparse.Namespace) -> int:
    from .combine import combine
    from .files import save_lora

    check_output(args.output, _lora_paths(args))
    _check_side_outputs(args, _lora_paths(args))
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

    check_output(args.output, [args.base, args.tuned])
    _check_side_outputs(args, [args.base, args.tuned])
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
    p.add_argument("--family", choices=families.IDS, help="model family, when the keys do not tell")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read legacy .pt/.ckpt/.bin files (with torch weights_only=True); pickles can run code")
    p.add_argument("--lenient", action="store_true", help="load the layers that are understood and list the rest")


def build_parser() -> argparse.ArgumentParser:
    from .formats import WRITABLE

    parser = argparse.ArgumentParser(prog="lora-ops", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lora-ops {package_version()}")
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
    p.add_argument("--component", choices=["unet", "transformer", "text_encoder", "text_encoder_2"],
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

    # "combine", not "merge": elsewhere (Merge & Unload, bake) merging means fusing a LoRA into model weights.
    # "merge" stays as an alias so existing scripts keep working.
    p = sub.add_parser("combine", aliases=["merge"],
                       help="combine several LoRAs into one LoRA (concat, svd, linear, ties, dare); alias: merge")
    p.add_argument("loras", nargs="+", metavar="LORA[:w[:w_text]]")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--method", default="concat",
                   choices=["concat", "svd", "linear", "ties", "dare_linear", "dare_ties"],
                   help="concat is exact (rank = sum of ranks); svd is exact then truncated by the rank rule")
    p.add_argument("--density", type=float, default=0.5, help="ties/dare: fraction of entries kept")
    p.add_argument("--seed", type=int, default=0, help="dare: random seed (deterministic)")
    rank_options(p, required=False)
    p.set_defaults(func=cmd_combine)

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


def package_version() -> str:
    """The installed distribution's version; the source tree's ``__version__`` when not installed (a clone)."""
    from importlib import metadata

    try:
        return metadata.version("lora-ops")
    except metadata.PackageNotFoundError:
        from . import __version__

        return f"{__version__} (not installed)"


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
        sys.stderr.write(f"lora-ops {args.command}: error: {one_line(err)}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"lora-ops {args.command}: interrupted\n")
        return 130


def one_line(err: LoraOpsError) -> str:
    """The error as this command line says it: its hints in CLI flags, on a single line."""
    return " ".join(err.message(CLI_WORDING).splitlines())


if __name__ == "__main__":
    sys.exit(main())
