"""Real ComfyUI, imported in-process from the checkout in ``COMFYUI_PATH``; every test here is skipped without it.

ComfyUI is not on PyPI and is never copied into this repository: point ``COMFYUI_PATH`` at a checkout outside it
(its python requirements installed, torch left as it is). ComfyUI imports torchvision at start-up only to use it
inside models these tests never build. Where torchvision is not installed, ``COMFYUI_STUBS`` may name a folder
(outside the repo) holding an import stub of it; it is put on sys.path only while ComfyUI is imported and taken off
again afterwards, because transformers treats any importable torchvision as real and would then fail to import
its image utilities. The fixtures build the smallest real models: ComfyUI's own SD 1.5 model class around the tiny
SD 1.5-layout UNet of `lora_ops.testing.tiny` (its detector only recognises SD 1.5 at full width, so the config is
detected from the weights and the SD15 class is chosen explicitly), and ComfyUI's SD1 CLIP with a tiny config.

After the last test here (package scope) ComfyUI's modules and sys.path entries are removed again, so later
tests see the pack standalone.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lora_ops import keymap
from lora_ops.testing import tiny

HERE = Path(__file__).resolve().parent
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
COMFYUI_STUBS = os.environ.get("COMFYUI_STUBS")
# The tiny text encoder of lora_ops.testing.tiny, spelled as ComfyUI's CLIP-L config overrides.
TINY_CLIP = {"hidden_size": tiny.TEXT_HIDDEN, "intermediate_size": 4 * tiny.TEXT_HIDDEN, "num_hidden_layers": 2,
             "num_attention_heads": 2, "projection_dim": tiny.TE2_PROJECTION}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.comfyui)
            if not COMFYUI_PATH:
                item.add_marker(pytest.mark.skip(reason="set COMFYUI_PATH to a ComfyUI checkout to run these"))


@pytest.fixture(scope="package")
def comfy():
    """ComfyUI's modules, imported on the CPU: ``comfy``, ``nodes`` (ComfyUI's), ``folder_paths``, version."""
    root = Path(COMFYUI_PATH).resolve()
    _prime_hf_imports()
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    stubs = _stub_torchvision_if_missing()
    sys.path.insert(0, str(root))
    # Order matters, so no import statements (a sorter would reorder them): ComfyUI's own `utils` package before
    # its nodes.py puts comfy/ first on sys.path, and the CPU flag before comfy.model_management is imported.
    importlib.import_module("utils")
    importlib.import_module("comfy.cli_args")
    comfy = sys.modules["comfy"]
    comfy.cli_args.args.cpu = True
    for name in ("model_management", "lora", "model_detection", "model_patcher", "sd", "sd1_clip", "supported_models",
                 "supported_models_base"):
        importlib.import_module(f"comfy.{name}")
    version = importlib.import_module("comfyui_version").__version__
    folder_paths = importlib.import_module("folder_paths")
    nodes = importlib.import_module("nodes")
    assert Path(nodes.__file__).resolve().parent == root, f"'nodes' is not ComfyUI's: {nodes.__file__}"
    if stubs:  # ComfyUI's modules keep their reference to the stub; nobody else may find it
        sys.path.remove(stubs)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    torch.set_num_threads(1)
    yield SimpleNamespace(comfy=comfy, nodes=nodes, folder_paths=folder_paths, version=version)
    comfy.model_management.unload_all_models()
    sys.path[:] = saved_path
    # Decide for every module first: a namespace package's __path__ looks its parent up in sys.modules.
    ours = [name for name in set(sys.modules) - saved_modules if _inside(sys.modules[name], root)]
    for name in ours:
        del sys.modules[name]


def _inside(module, root: Path) -> bool:
    """Whether a module was loaded from ``root`` (namespace packages such as ``comfy`` have only a __path__)."""
    file = getattr(module, "__file__", None)
    places = [file] if file else list(getattr(module, "__path__", []))
    return any(Path(p).resolve().is_relative_to(root) for p in places)


def _prime_hf_imports() -> None:
    """Import what the tests need from diffusers/transformers before ComfyUI (and any stub) is on the path."""
    import diffusers.models.unets.unet_2d_condition  # noqa: F401
    import transformers.image_utils  # noqa: F401
    import transformers.models.clip.modeling_clip  # noqa: F401


def _stub_torchvision_if_missing() -> str | None:
    """Put COMFYUI_STUBS on sys.path when torchvision does not import; returns the entry to take off later."""
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        if not COMFYUI_STUBS:
            pytest.skip("torchvision does not import: install it, or set COMFYUI_STUBS to a folder with a stub")
        sys.path.insert(0, COMFYUI_STUBS)
        return COMFYUI_STUBS
    return None


@pytest.fixture(scope="package")
def loras_dir(comfy, tmp_path_factory):
    """A folder registered as ComfyUI's first `loras` folder (for ComfyUI's loaders and our Load node)."""
    folder = tmp_path_factory.mktemp("loras")
    comfy.folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    return folder


@pytest.fixture(scope="package")
def unet_sd():
    """The tiny SD 1.5-layout UNet's weights under their original (LDM) names, as a checkpoint holds them."""
    unet = tiny.tiny_unet("sd1")
    out = {}
    for name, tensor in unet.state_dict().items():
        module, leaf = name.rsplit(".", 1)
        out[f"{keymap.unet_diffusers_to_ldm(module, 'sd1')}.{leaf}"] = tensor.detach().clone()
    return out


@pytest.fixture(scope="package")
def clip_sd(comfy):
    """Random weights for ComfyUI's SD1 CLIP with the tiny config (names as its state dict has them)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, tensor in make_clip_model(comfy).cond_stage_model.state_dict().items():
        if tensor.ndim >= 2:
            out[name] = torch.randn(tensor.shape, generator=gen) * 0.1
        elif name.endswith(".weight"):
            out[name] = torch.ones(tensor.shape)  # layer norms
        else:
            out[name] = torch.zeros(tensor.shape)
    return out


def make_clip_model(comfy):
    """ComfyUI's SD1 CLIP (its tokenizer, its CLIP-L module) with the tiny config; weights not loaded."""
    target = comfy.comfy.supported_models_base.ClipTarget(comfy.comfy.sd1_clip.SD1Tokenizer,
                                                          comfy.comfy.sd1_clip.SD1ClipModel)
    return comfy.comfy.sd.CLIP(target=target, model_options={"clip_l_model_config": dict(TINY_CLIP)})


@pytest.fixture
def build(comfy, unet_sd, clip_sd):
    """Factories for a fresh MODEL / CLIP, from the tiny weights or from given ones (e.g. fused references)."""

    def model(sd=None):
        c = comfy.comfy
        sd = dict(unet_sd if sd is None else sd)
        config = c.model_detection.detect_unet_config(sd, "")
        model_config = c.supported_models.SD15(config)
        model_config.set_inference_dtype(torch.float32, None)
        base = model_config.get_model(sd, "")
        base.load_model_weights(sd, "")
        assert not sd, f"weights not loaded: {sorted(sd)[:3]}"
        mm = c.model_management
        return c.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())

    def clip(sd=None):
        new = make_clip_model(comfy)
        missing, unexpected = new.load_sd(dict(clip_sd if sd is None else sd), full_model=True)
        assert not missing and not unexpected, (missing, unexpected)
        return new

    return SimpleNamespace(model=model, clip=clip)
