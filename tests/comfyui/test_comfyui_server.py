"""The real ComfyUI server (a subprocess, ``main.py --cpu``) with this repo installed as a custom node.

Checked against ComfyUI 0.3.64. Skipped without ``COMFYUI_PATH`` (tests/comfyui/conftest.py). Nothing is written
inside the ComfyUI checkout: the server runs with ``--base-directory`` in a scratch folder holding
``custom_nodes/lora_ops`` (a symlink to this repo), the models, the input image and a file-backed sqlite database.

How ComfyUI gets a tiny model: ``CheckpointLoaderSimple`` picks the architecture from the weights' names and
shapes, and it recognises SD 1.5 only at full width, with CLIP-L at its fixed size (hundreds of MB of random
weights) — too slow for a test. So the test writes a *test-only* custom node into the scratch folder,
``custom_nodes/loraops_test_tiny`` (it is not part of the pack), whose ``TinyCheckpointLoader`` loads a tiny
checkpoint file from ``models/checkpoints`` exactly the way tests/comfyui/conftest.py builds its models: ComfyUI's
own SD15 model class around the tiny SD 1.5-layout UNet (config detected from the weights), ComfyUI's own SD1 CLIP
with a tiny config, and ComfyUI's own TAESD as the VAE; every node downstream is ComfyUI's or ours, unchanged. When
posting an example workflow the test swaps ``CheckpointLoaderSimple`` for it (same input, same outputs) and shrinks
the work (64×64 latents, 2 sampler steps, 3 training steps), with a fresh seed per run so ComfyUI's cache never
skips a node. Everything else in the example files is posted as written.

torchvision and torchaudio: ComfyUI imports them at start-up (and only uses them inside models never built here).
Where one does not import, the server gets a stub written by this test: any submodule imports, and every name is a
placeholder that raises when used (transformers, seeing an importable torchvision, imports names from its
submodules at module level; ComfyUI 0.33 imports ``torchvision.ops``, ``torchvision.models.optical_flow`` and
torchaudio).

What is asserted:
- the server starts with the pack loaded (no import failure for it in the log), every ``LoraOps*`` id of our
  NODE_CLASS_MAPPINGS is in ``GET /object_info`` with our INPUT_TYPES' input order and our RETURN_TYPES, and the
  core-node table of examples/workflows/make_ui.py (used to write the UI workflows) matches ComfyUI's own;
- ``GET /extensions`` lists every web/*.js file, and each is served;
- every example workflow in API format runs to completion through ``POST /prompt`` (status success, polled on
  ``/history/<id>``) and every file its save nodes write exists (LoRAs under output/loras, loadable; images;
  the merged checkpoint); training sends ``loraops.train.progress`` messages over the websocket, one per step;
- bad inputs: a hostile ``filename_prefix`` (``../../x``) on LoraOpsSave fails with an execution error naming the
  node and the reason, and nothing is written outside the output folder; a missing LoRA file is refused by
  ``POST /prompt`` with a message naming the node and the file.
"""

from __future__ import annotations

import asyncio
import copy
import importlib
import importlib.util
import json
import math
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import import_pack, sample_lora
from PIL import Image
from safetensors.torch import save_file

from lora_ops.files import load_lora, save_lora

from .conftest import COMFYUI_PATH, TINY_CLIP

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "examples" / "workflows").glob("*.api.json"))
pack = import_pack()
TINY_LOADER = "TinyCheckpointLoader"
START_TIMEOUT = 90
RUN_TIMEOUT = 90

TINY_NODE = '''"""Test-only node, written by LoRA Ops' tests/comfyui/test_comfyui_server.py into a scratch folder.

TinyCheckpointLoader loads a tiny checkpoint the way tests/comfyui/conftest.py builds its models: ComfyUI's SD15
model class around a tiny SD 1.5-layout UNet (config detected from the weights), ComfyUI's SD1 CLIP with a tiny
config, ComfyUI's TAESD as the VAE.
"""

import json

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils
import folder_paths
import torch

TINY_CLIP = json.loads(%r)


def part(sd, prefix):
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


class TinyCheckpointLoader:
    CATEGORY = "_for_testing"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),)}}

    def load(self, ckpt_name):
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path_or_raise("checkpoints", ckpt_name))
        unet = part(sd, "model.diffusion_model.")
        model_config = comfy.supported_models.SD15(comfy.model_detection.detect_unet_config(unet, ""))
        model_config.set_inference_dtype(torch.float32, None)
        base = model_config.get_model(unet, "")
        base.load_model_weights(unet, "")
        if unet:
            raise ValueError(f"UNet weights not loaded: {sorted(unet)[:3]}")
        mm = comfy.model_management
        model = comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                                 offload_device=mm.unet_offload_device())
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        clip = comfy.sd.CLIP(target=target, model_options={"clip_l_model_config": dict(TINY_CLIP)})
        missing, unexpected = clip.load_sd(part(sd, "cond_stage_model."), full_model=True)
        if missing or unexpected:
            raise ValueError(f"CLIP weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        return (model, clip, comfy.sd.VAE(sd=part(sd, "first_stage_model.")))


NODE_CLASS_MAPPINGS = {"TinyCheckpointLoader": TinyCheckpointLoader}
'''

# torchvision / torchaudio stubs for the server process (only where the real package does not import; PyPI's builds
# do not load with the pinned torch here). ComfyUI 0.3.64 imports torchvision at start-up, 0.33 also
# `torchvision.ops`, `torchvision.models.optical_flow` and torchaudio, and transformers imports names from
# torchvision's submodules: a meta-path finder makes any submodule on demand, and every attribute is a placeholder
# that raises when called (no model these tests build uses them).
STUB_PACKAGE = '''"""%(name)s stub of LoRA Ops' server test: any submodule, placeholders that raise when used."""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+loraops.stub"


class Missing:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name}: %(name)s is a test stub here; install %(name)s for this model")

    def __repr__(self):
        return f"<%(name)s stub {self._name}>"


class _Module(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Missing(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("%(name)s."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _Finder())


def __getattr__(attr):
    if attr.startswith("__"):
        raise AttributeError(attr)
    return Missing(f"%(name)s.{attr}")
'''
STUBBED = ("torchvision", "torchaudio")


# ----------------------------------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def imports(module: str) -> bool:
    """Whether ``module`` imports in a fresh interpreter (this process may hold stubs or ComfyUI's paths)."""
    return subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True).returncode == 0


def write_files(base: Path, unet_sd, clip_sd) -> None:
    """The pack (symlink), the test-only tiny loader, tiny checkpoints, two LoRAs and an input image."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "lora_ops").symlink_to(ROOT, target_is_directory=True)
    tiny = base / "custom_nodes" / "loraops_test_tiny"
    tiny.mkdir()
    (tiny / "__init__.py").write_text(TINY_NODE % json.dumps(TINY_CLIP), encoding="utf-8")

    vae_sd = tiny_vae_weights()
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    tuned = {k: v + 0.02 * torch.randn(v.shape, generator=gen) if v.ndim >= 2 else v for k, v in unet_sd.items()}
    for name, unet in (("v1-5-pruned-emaonly", unet_sd), ("my_finetune", tuned)):
        sd = {**{f"model.diffusion_model.{k}": v for k, v in unet.items()},
              **{f"cond_stage_model.{k}": v for k, v in clip_sd.items()},
              **{f"first_stage_model.{k}": v for k, v in vae_sd.items()}}
        save_file({k: v.contiguous() for k, v in sd.items()}, str(checkpoints / f"{name}.safetensors"))

    loras = base / "models" / "loras"
    loras.mkdir(parents=True)
    save_lora(sample_lora("sd1", rank=4, alpha=2.0, seed=0), loras / "my_style.safetensors", "kohya")
    save_lora(sample_lora("sd1", rank=2, alpha=1.0, seed=1, attention_only=True), loras / "my_character.safetensors",
              "diffusers")

    (base / "input").mkdir()
    pixels = torch.zeros(64, 64, 3, dtype=torch.uint8)
    pixels[16:48, 16:48, 0] = 220  # a red square to learn
    Image.fromarray(pixels.numpy()).save(base / "input" / "example.png")
    data = base / "input" / "my_style" / "2_sks"  # the training example's data_folder, kohya layout
    data.mkdir(parents=True)
    for i in range(2):
        Image.fromarray(pixels.roll(4 * i, dims=1).numpy()).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a red square on black")


def tiny_vae_weights() -> dict[str, torch.Tensor]:
    """Random weights for ComfyUI's TAESD (2.4 M parameters; its layers are built uninitialised, so set them all)."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, tensor in importlib.import_module("comfy.taesd.taesd").TAESD().state_dict().items():
        if tensor.ndim >= 2:  # conv weight (out, in, k, k): variance-preserving scale
            out[name] = torch.randn(tensor.shape, generator=gen) / math.sqrt(tensor[0].numel())
        else:
            out[name] = torch.ones(tensor.shape) if name == "vae_scale" else torch.zeros(tensor.shape)
    return out


class Messages:
    """Collects the server's websocket messages (JSON) for one client id, in a background thread."""

    def __init__(self, url: str, client_id: str):
        self.items: list[dict] = []
        self.ready = threading.Event()
        self._stop = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._listen(url, client_id),), daemon=True)
        self._thread.start()
        self.ready.wait(20)

    async def _listen(self, url: str, client_id: str) -> None:
        import aiohttp

        self._stop = asyncio.get_running_loop().create_future()
        self._loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/ws?clientId={client_id}") as ws:
            self.ready.set()
            while not self._stop.done():
                receive = asyncio.ensure_future(ws.receive())
                await asyncio.wait([receive, self._stop], return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    receive.cancel()
                    break
                message = receive.result()
                if message.type == aiohttp.WSMsgType.TEXT:
                    self.items.append(json.loads(message.data))
                elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break

    def of(self, kind: str) -> list[dict]:
        return [m["data"] for m in list(self.items) if m.get("type") == kind]

    def close(self) -> None:
        if self._stop is not None and not self._stop.done():
            self._loop.call_soon_threadsafe(self._stop.set_result, None)
        self._thread.join(10)


@pytest.fixture(scope="module")
def server(comfy, unet_sd, clip_sd, tmp_path_factory):
    """A running ComfyUI server with the pack; yields url, base folder, log file, websocket messages."""
    scratch = tmp_path_factory.mktemp("comfyui_server")
    base = scratch / "comfy"
    write_files(base, unet_sd, clip_sd)  # (`comfy`: ComfyUI imported here too, for its TAESD class)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    missing = [name for name in STUBBED if not imports(name)]
    if missing:
        stubs = scratch / "stubs"
        for name in missing:
            (stubs / name).mkdir(parents=True)
            (stubs / name / "__init__.py").write_text(STUB_PACKAGE % {"name": name}, encoding="utf-8")
        env["PYTHONPATH"] = os.pathsep.join([str(stubs), *filter(None, [env.get("PYTHONPATH")])])
    port = free_port()
    args = [sys.executable, str(Path(COMFYUI_PATH) / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
            "--base-directory", str(base), "--disable-auto-launch", "--database-url",
            f"sqlite:///{scratch / 'db.sqlite'}"]
    if not imports("comfyui_frontend_package"):  # the front end (a pip package) is not needed for the HTTP API
        (scratch / "frontend").mkdir()
        (scratch / "frontend" / "index.html").write_text("<!doctype html><title>no front end</title>\n")
        args += ["--front-end-root", str(scratch / "frontend")]
    log = scratch / "server.log"
    started = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=scratch, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            if time.perf_counter() - started > START_TIMEOUT:
                pytest.fail(f"ComfyUI did not answer in {START_TIMEOUT} s:\n{log.read_text(errors='replace')[-4000:]}")
            try:
                get(url, "/system_stats")
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.3)
        client_id = f"loraops-test-{random.randrange(1 << 30)}"
        start_s = time.perf_counter() - started
        startup_log = log.read_text(errors="replace")
        messages = Messages(url, client_id)
        assert messages.ready.is_set(), "could not connect to the server's websocket"
        yield SimpleNamespace(url=url, base=base, scratch=scratch, log=log, startup_log=startup_log,
                              messages=messages, client_id=client_id, start_s=start_s)
        messages.close()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def get(url: str, path: str):
    with urllib.request.urlopen(url + path, timeout=20) as res:
        body = res.read()
    return json.loads(body) if body[:1] in (b"{", b"[") else body


def post_prompt(server, graph: dict) -> tuple[int, dict]:
    body = json.dumps({"prompt": graph, "client_id": server.client_id}).encode()
    request = urllib.request.Request(server.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=20) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def run(server, graph: dict) -> dict:
    """POST the graph, then poll its history entry until it finished; returns that entry."""
    status, answer = post_prompt(server, graph)
    assert status == 200, f"POST /prompt refused the graph: {json.dumps(answer)[:2000]}"
    prompt_id = answer["prompt_id"]
    deadline = time.perf_counter() + RUN_TIMEOUT
    while time.perf_counter() < deadline:
        entry = get(server.url, f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None and entry["status"].get("status_str"):
            return entry
        time.sleep(0.2)
    pytest.fail(f"prompt {prompt_id} did not finish in {RUN_TIMEOUT} s:\n{server.log.read_text()[-3000:]}")


def for_test(graph: dict, seed: int) -> dict:
    """The example graph on the tiny model, with little work and a fresh seed (see the module docstring)."""
    graph = copy.deepcopy(graph)
    for node in graph.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            node["class_type"] = TINY_LOADER
        elif kind == "EmptyLatentImage":
            inputs.update(width=64, height=64, batch_size=1)
        elif kind == "KSampler":
            inputs.update(steps=2, seed=seed)
        elif kind == "LoraOpsTrain":
            inputs.update(steps=3, rank=2, alpha=2.0, learning_rate=1e-3, seed=seed, run_name=f"test_{seed}",
                          resolution=64, save_every_steps=0)
        elif kind == "LoraOpsCombine":
            inputs.update(seed=seed)
    return graph


def error_of(entry: dict) -> dict:
    errors = [data for kind, data in entry["status"].get("messages", []) if kind == "execution_error"]
    assert errors, f"no execution_error in {entry['status']}"
    return errors[0]


# ------------------------------------------------------------------------------------------------------ the tests
def test_server_starts_with_the_pack_loaded(server):
    log = server.startup_log
    ours = str(server.base / "custom_nodes" / "lora_ops")
    lines = [line for line in log.splitlines() if line.rstrip().endswith(ours)]
    assert lines, f"the pack is not in the import list:\n{log[-3000:]}"
    assert not [line for line in lines if "IMPORT FAILED" in line], lines
    custom = str(server.base / "custom_nodes")
    failed = [line for line in log.splitlines() if line.startswith("Cannot import") and custom in line]
    assert not failed, failed  # (ComfyUI's own comfy_extras may miss optional packages here; not our concern)
    frames = [line for line in log.splitlines() if line.strip().startswith("File") and (custom in line or
                                                                                         str(ROOT) in line)]
    assert not frames, f"a traceback through our code:\n{log[-3000:]}"

    info = get(server.url, "/object_info")
    ids = [name for name in pack.NODE_CLASS_MAPPINGS if name.startswith("LoraOps")]
    assert len(ids) == len(pack.NODE_CLASS_MAPPINGS) >= 11
    assert set(ids) <= set(info), sorted(set(ids) - set(info))
    for name in ids:
        cls = pack.NODE_CLASS_MAPPINGS[name]
        types = cls.INPUT_TYPES()
        order = info[name]["input_order"]
        for group in ("required", "optional"):
            assert order.get(group, []) == list(types.get(group, {})), (name, group)
        assert tuple(info[name]["output"]) == cls.RETURN_TYPES, name
        assert info[name]["category"].startswith("LoRA Ops"), name
        assert info[name]["output_node"] == bool(getattr(cls, "OUTPUT_NODE", False)), name
    assert TINY_LOADER in info


def test_the_ui_converters_core_node_table_is_comfyuis(server):
    make_ui = _load_make_ui()
    info = get(server.url, "/object_info")
    for name, spec in make_ui.CORE.items():
        node = info[name]
        listed = [(n, group) for group in ("required", "optional") for n in node["input_order"].get(group, [])]
        assert [n for n, _ in listed] == [n for n, _, _ in spec["inputs"]], name
        for (input_name, group), (_, kind, options) in zip(listed, spec["inputs"], strict=True):
            entry = node["input"][group][input_name]
            actual = "COMBO" if isinstance(entry[0], list) else entry[0]
            assert actual == kind, (name, input_name, actual)
            for key in ("image_upload", "multiline", "control_after_generate"):
                if options.get(key):
                    assert entry[1].get(key), (name, input_name, key)
        # ComfyUI may give a node outputs it did not have (0.33's SaveImage returns its images): workflows that link
        # none of them still load, so ours must be the node's first outputs, in order
        actual = [tuple(x) for x in zip(node["output_name"], node["output"], strict=True)]
        assert actual[: len(spec["outputs"])] == [tuple(x) for x in spec["outputs"]], name


def _load_make_ui():
    spec = importlib.util.spec_from_file_location("loraops_make_ui", ROOT / "examples" / "workflows" / "make_ui.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_extensions_lists_the_web_files(server):
    listed = get(server.url, "/extensions")
    files = sorted(p.name for p in (ROOT / "web").glob("*.js"))
    assert files
    for name in files:
        path = f"/extensions/lora_ops/{name}"
        assert path in listed, (path, listed)
        assert get(server.url, path) == (ROOT / "web" / name).read_bytes()


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name.removesuffix(".api.json"))
def test_example_workflow_runs(server, path):
    example = json.loads(path.read_text(encoding="utf-8"))
    graph = for_test(example, random.randrange(1, 2**31 - 1))
    started = time.perf_counter()
    entry = run(server, graph)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
    outputs, output = entry["outputs"], server.base / "output"
    for node_id, node in graph.items():
        kind = node["class_type"]
        if kind == "LoraOpsSave":
            (rel,) = outputs[node_id]["text"]
            file = output / rel
            assert file.is_file() and file.resolve().is_relative_to(output / "loras"), rel
            assert load_lora(file).layers
        elif kind in ("SaveImage", "PreviewImage"):
            images = outputs[node_id]["images"]
            assert images
            for image in images:
                folder = server.base / image["type"]
                assert (folder / image["subfolder"] / image["filename"]).is_file(), image
        elif kind == "CheckpointSave":
            prefix = Path(node["inputs"]["filename_prefix"])
            assert list((output / prefix.parent).glob(f"{prefix.name}_*.safetensors")), prefix
        elif kind == "LoraOpsTrain":
            run_folder = output / "loras" / f"{node['inputs']['run_name']}_00001"
            trained = load_lora(run_folder / f"{node['inputs']['run_name']}.safetensors")
            if node["inputs"].get("data_folder"):  # input/my_style: 2 images in a 2_sks repeat folder
                assert trained.metadata["ss_num_train_images"] == "4", trained.metadata
                assert "sks" in json.loads(trained.metadata["ss_tag_frequency"])["2_sks"]
            progress = [m for m in server.messages.of("loraops.train.progress") if m.get("node") == node_id]
            steps = [m for m in progress if "loss" in m]
            assert [m["step"] for m in steps] == [1, 2, 3] and {m["total"] for m in steps} == {3}, progress
            assert all(math.isfinite(m["loss"]) and m["lr"] > 0 for m in steps)
            assert progress[0].get("reset") and progress[-1].get("done"), progress
    elapsed = time.perf_counter() - started
    sys.stderr.write(f"{path.name}: {elapsed:.1f} s (server start {server.start_s:.1f} s)\n")


def test_a_hostile_filename_prefix_is_refused_and_nothing_escapes(server):
    graph = for_test(json.loads((ROOT / "examples" / "workflows" / "resize.api.json").read_text()), 1)
    save_id = next(i for i, n in graph.items() if n["class_type"] == "LoraOpsSave")
    graph[save_id]["inputs"]["filename_prefix"] = "../../x"
    outside = {server.scratch: set(server.scratch.iterdir()), server.base: set(server.base.iterdir())}
    entry = run(server, graph)
    assert entry["status"]["status_str"] == "error"
    error = error_of(entry)
    assert error["node_type"] == "LoraOpsSave" and error["node_id"] == save_id, error
    assert "outside the allowed folder" in error["exception_message"] and "../../x" in error["exception_message"]
    for folder, before in outside.items():
        assert set(folder.iterdir()) == before, folder
    assert not list(server.scratch.glob("x*")) and not list(server.base.glob("x*"))


def test_a_missing_lora_file_is_refused_by_post_prompt(server):
    graph = for_test(json.loads((ROOT / "examples" / "workflows" / "resize.api.json").read_text()), 2)
    load_id = next(i for i, n in graph.items() if n["class_type"] == "LoraOpsLoad")
    graph[load_id]["inputs"]["lora_name"] = "no_such_lora.safetensors"
    status, answer = post_prompt(server, graph)
    assert status == 400, answer
    errors = answer["node_errors"][load_id]
    assert errors["class_type"] == "LoraOpsLoad"
    assert "no_such_lora.safetensors" in json.dumps(errors["errors"]) and "not found" in json.dumps(errors["errors"])
