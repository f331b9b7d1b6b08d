"""Every fenced block of the README is exercised or checked, so the README cannot drift from the code.

Each block is classified by `HANDLERS` (its language and first line); a block no handler claims fails the test, so
a new block must come with its check. Commands that cannot run here (cloning into a ComfyUI checkout) are checked
for what they name: the files exist and the install command installs what the pack imports.
"""

import re
import tomllib
from pathlib import Path

import pytest
from helpers import import_pack

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, re.S | re.M)
CI = (ROOT / ".ci" / "run").read_text()
# ComfyUI core nodes the README's graph diagram names (display names as ComfyUI shows them).
CORE_NODES = {"Load Checkpoint", "KSampler", "Checkpoint Save"}


def check_setup_and_demo(block: str) -> None:
    """`pip install -e ".[test]" && lora-ops demo --out DIR`: CI runs the same install; the demo command parses and
    its console script is declared (tests/test_demo.py runs the demo itself, test_cli the console script)."""
    from lora_ops.cli import build_parser

    install, demo = (part.strip() for part in block.strip().split("&&"))
    ci_install = [line.replace("python -m ", "").replace(" -q", "")
                  for line in CI.splitlines() if "pip install" in line]
    assert install in ci_install, (install, ci_install)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    argv = demo.split()
    assert argv[0] in scripts and build_parser().parse_args(argv[1:]).command == "demo"


def check_clone_and_venv(block: str) -> None:
    """The clone URL is the project's (pyproject's Repository URL), the venv folder is one git ignores."""
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    clone, venv = (line.split("#")[0].strip() for line in block.strip().splitlines())
    assert clone == f"git clone {urls['Repository']} && cd {urls['Repository'].rsplit('/', 1)[-1]}"
    assert venv.startswith("python3 -m venv .venv && . .venv/bin/activate")
    assert ".venv/" in (ROOT / ".gitignore").read_text().split()


def check_test_command(block: str) -> None:
    assert block.strip() in CI.splitlines()


def check_comfyui_install(block: str) -> None:
    """The ComfyUI install names requirements.txt, which must cover every third-party import of the pack (torch
    excepted: ComfyUI brings its own)."""
    lines = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    urls = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["urls"]
    assert lines[0] == "cd ComfyUI/custom_nodes" and lines[1].startswith(f"git clone {urls['Repository']} ")
    folder = lines[1].split()[-1]
    assert lines[2] == f"pip install -r {folder}/requirements.txt"
    required = {re.split(r"[<>=~ ]", line.strip())[0].lower()
                for line in (ROOT / "requirements.txt").read_text().splitlines() if line.strip() and line[0] != "#"}
    imported = set()
    for path in [*ROOT.glob("nodes/*.py"), *ROOT.glob("lora_ops/**/*.py")]:
        if "testing" in path.parts or path.name in ("demo.py", "cli.py", "diffusers_backend.py"):
            continue  # the CLI/demo/tests use the `hf` extra; the pack itself does not import it
        imported |= set(re.findall(r"^\s*(?:from|import) (\w+)", path.read_text(), re.M))
    third_party = imported - {"torch", "__future__"} - set(__import__("sys").stdlib_module_names) - {"lora_ops"}
    third_party -= {"comfy", "folder_paths", "server", "aiohttp", "diffusers", "transformers"}  # ComfyUI's own
    names = {"PIL": "pillow"}
    assert {names.get(m, m).lower() for m in third_party} <= required, third_party


def check_graph_diagram(block: str) -> None:
    """Every box of the typical-graph diagram is one of our nodes (its display name, or the unique start of one)
    or a ComfyUI core node."""
    pack = import_pack()
    ours = {name.removesuffix(" (LoRA Ops)") for name in pack.NODE_DISPLAY_NAME_MAPPINGS.values()}
    boxes = set()
    for line in block.splitlines():
        for part in re.split(r"[─►┬┘┐└│,]+|MODEL|CLIP|/", line):
            part = part.strip()
            if part:
                boxes.add(part)
    unknown = {b for b in boxes - CORE_NODES if len([n for n in ours if n == b or n.startswith(b + " ")]) != 1}
    assert not unknown, unknown


def check_cli_reference(block: str) -> None:
    """Parsed by tests/test_package.py (test_readme_cli_reference_parses); here: each line is a real command and
    every option it names (`--rank`, `-o` …) is one of that command's options."""
    from lora_ops.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    for line in block.strip().splitlines():
        command = commands[line.split()[1]]
        known = {s for action in command._actions for s in action.option_strings}
        named = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", line))
        assert named <= known, f"README: `lora-ops {line.split()[1]}` has no option {sorted(named - known)}"


def check_layout(block: str) -> None:
    """Every file or folder the layout names exists (indented lines: inside the folder named above them)."""
    parent = ROOT
    for line in block.splitlines():
        names = re.findall(r"(?<![\w/])(\w+(?:/\w+)*(?:/|\.py))", line)
        if not line.startswith(" ") and names:
            parent = ROOT / names[0] if names[0].endswith("/") else ROOT
        base = parent if line.startswith(" ") else ROOT
        for name in names:
            assert (base / name).exists(), f"README layout names {name!r}, not in {base.relative_to(ROOT.parent)}"


def check_family_example(block: str) -> None:
    """The "Adding a model family" module, registered for the check: kohya and diffusers files of it are detected,
    convert into each other exactly, and inspect counts its fused weight's parts."""
    import torch

    from lora_ops import families, fused
    from lora_ops import lora as L
    from lora_ops.formats import read_lora, write_lora
    from lora_ops.inspect import inspect_lora
    from lora_ops.keymap import register_compound_tokens

    namespace: dict = {}
    exec(compile(block, "README:toydit", "exec"), namespace)  # noqa: S102 -- the README's own example code
    fam = namespace["FAMILY"]
    g = torch.Generator().manual_seed(0)
    h = 8
    shapes = {"layers.0.attn.qkv": (3 * h, h), "layers.1.attn.out": (h, h), "layers.1.mlp.fc1": (4 * h, h)}
    lora = L.LoRA({f"unet.{p}": L.LoRALayer(torch.randn(2, i, generator=g), torch.randn(o, 2, generator=g), 1.0)
                   for p, (o, i) in shapes.items()}, family=fam.id)
    saved = dict(families.REGISTRY)
    families.REGISTRY[fam.id] = fam
    register_compound_tokens(fam.compound_tokens)
    try:
        kohya, meta = write_lora(lora, "kohya")
        assert "lora_unet_layers_0_attn_qkv.lora_down.weight" in kohya
        diffusers, dmeta = write_lora(lora, "diffusers")
        assert "transformer.dit_blocks.0.attn.to_k.lora_A.weight" in diffusers
        for tensors, m in ((kohya, meta), (diffusers, dmeta)):
            got, unused = read_lora(tensors, m)
            assert unused == [] and got.family == "toydit"
            for key, layer in fused.fuse(got).layers.items():
                assert torch.allclose(layer.delta(), lora[key].delta(), atol=1e-6), key
        parts = read_lora(diffusers, dmeta)[0]
        assert inspect_lora(parts)["fused_weights"] == {"layers.*.attn.qkv": {"q": 1, "k": 1, "v": 1}}
    finally:
        families.REGISTRY.clear()
        families.REGISTRY.update(saved)


HANDLERS = [
    ("bash", "git clone ", check_clone_and_venv),
    ("bash", 'pip install -e ".[test]" && lora-ops demo', check_setup_and_demo),
    ("bash", "python -m pytest -q", check_test_command),
    ("bash", "cd ComfyUI/custom_nodes", check_comfyui_install),
    ("text", "Load Checkpoint", check_graph_diagram),
    ("text", "lora-ops inspect", check_cli_reference),
    ("", "__init__.py", check_layout),
    ("python", "# lora_ops/families/", check_family_example),
]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_readme_block_is_checked(index):
    language, body = BLOCKS[index]
    claimed = [check for lang, first, check in HANDLERS if lang == language and body.lstrip().startswith(first)]
    assert claimed, f"README block {index + 1} ({language or 'plain'}: {body.splitlines()[0]!r}) has no check"
    claimed[0](body)


def test_every_handler_still_has_its_block():
    for language, first, _ in HANDLERS:
        assert any(lang == language and body.lstrip().startswith(first) for lang, body in BLOCKS), first
