"""The repo as ComfyUI sees it, and the project's promises about imports and packaging."""

import pathlib
import re
import sys
import tomllib

import pytest
from helpers import import_pack

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_root_package_exports_what_comfyui_reads():
    pack = import_pack()
    assert isinstance(pack.NODE_CLASS_MAPPINGS, dict)
    assert isinstance(pack.NODE_DISPLAY_NAME_MAPPINGS, dict)
    assert pack.WEB_DIRECTORY == "./web"
    assert (ROOT / "web").is_dir() and any((ROOT / "web").glob("*.js"))
    assert not hasattr(pack, "comfy_entrypoint")  # ComfyUI takes one API or the other
    assert "comfy" not in sys.modules or not hasattr(sys.modules["comfy"], "__file__")


def test_library_never_imports_comfy():
    pattern = re.compile(r"^\s*(import comfy|from comfy)", re.M)
    offenders = [p for p in (ROOT / "lora_ops").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_packaging_installs_lora_ops_only_and_pins_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == ["lora_ops*"]  # never a top-level `nodes`
    deps = project["project"]["dependencies"]
    assert "torch==2.13.0" in deps
    assert all("==" in d for d in deps + project["project"]["optional-dependencies"]["hf"] if not d.startswith("numpy"))
    assert project["project"]["scripts"]["lora-ops"] == "lora_ops.cli:main"
    assert {"PublisherId", "DisplayName"} <= set(project["tool"]["comfy"])
    assert "torch" not in (ROOT / "requirements.txt").read_text().split("#")[0]


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert blocks[0].strip().startswith("git clone ")  # the clone and its venv come first
    assert blocks[1].strip().startswith("pip install -e \".[test]\" && lora-ops demo")
    test_command = blocks[2].strip()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci


def test_readme_cli_reference_parses():
    """Every `lora-ops …` line of the README's CLI reference is accepted by the real parser (placeholders filled)."""
    from lora_ops.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Command line\n\n```text\n(.*?)```", readme, re.S).group(1)
    samples = {
        "inspect": ["inspect", "f.safetensors", "--json"],
        "convert": ["convert", "a", "--to", "kohya", "-o", "b", "--component", "unet"],
        "resize": ["resize", "a", "-o", "b", "--sv-fro", "0.9", "--conv-rank", "4", "--report", "r", "--plot", "p"],
        "combine": ["combine", "a:0.7", "b:0.5:0.3", "-o", "c", "--method", "svd", "--rank", "8"],
        "extract": ["extract", "a", "b", "-o", "c", "--rank", "8"],
        "bake": ["bake", "ck", "l:1:0.5", "-o", "out", "--dtype", "fp16"],
        "train": ["train", "data", "--tiny", "sd1", "-o", "out", "--rank", "8", "--max-steps", "10"],
        "demo": ["demo", "--out", "d", "--steps", "20"],
    }
    documented = [line.split()[1] for line in block.splitlines() if line.startswith("lora-ops ")]
    choices = build_parser()._subparsers._group_actions[0].choices
    aliases = {"merge": "combine"}  # the old name of combine, kept for scripts (merging means fusing elsewhere)
    assert set(documented) == set(samples) == set(choices) - set(aliases)
    for argv in samples.values():
        build_parser().parse_args(argv)
    for alias, name in aliases.items():
        assert choices[alias] is choices[name]
        assert build_parser().parse_args([alias, "a", "-o", "b"]).func is build_parser().parse_args(
            [name, "a", "-o", "b"]).func


def test_demo_steps_must_be_a_positive_whole_number(capsys):
    from lora_ops.cli import build_parser

    assert build_parser().parse_args(["demo", "--steps", "7"]).steps == 7
    assert build_parser().parse_args(["demo"]).steps is None
    for bad in ("0", "-3", "2.5"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["demo", "--steps", bad])
        assert "--steps" in capsys.readouterr().err


@pytest.mark.parametrize("folder", ["lora-ops", "ComfyUI-LoRA-Ops"])
def test_tests_collect_from_a_clone_named_like_a_comfyui_pack(tmp_path, folder):
    """The README's test command from a clone whose folder name is not a Python identifier (pytest then imports
    the repo-root __init__.py as a plain module; it used to fail with 'attempted relative import')."""
    import shutil
    import subprocess

    clone = tmp_path / folder
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".*_cache"))
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_package.py",
         "-k", "root_package_exports or library_never_imports"],
        cwd=clone, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "2 passed" in run.stdout


def test_pack_imports_as_comfyui_loads_it_from_any_folder_name(tmp_path):
    """ComfyUI's load_custom_node: a module spec named after the folder, the folder as its search location."""
    import importlib.util

    link = tmp_path / "ComfyUI-LoRA-Ops"
    link.symlink_to(ROOT, target_is_directory=True)
    spec = importlib.util.spec_from_file_location(
        "ComfyUI-LoRA-Ops", link / "__init__.py", submodule_search_locations=[str(link)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert "LoraOpsLoad" in module.NODE_CLASS_MAPPINGS and module.WEB_DIRECTORY == "./web"
    finally:
        for name in [n for n in sys.modules if n == spec.name or n.startswith(spec.name + ".")]:
            del sys.modules[name]
