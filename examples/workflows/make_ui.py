"""Write the UI-format workflow (``X.json``, what users drag into the ComfyUI window) for every ``X.api.json`` here.

Dev script: ``python examples/workflows/make_ui.py`` rewrites the UI files, ``--check`` only reports (exit 1) the
ones that differ; tests/test_workflows.py regenerates and compares, so the two formats cannot drift apart.

The API file is the source. The UI file is ComfyUI's LiteGraph serialisation (``version 0.4``): nodes with id,
type, pos, size, inputs (the link sockets, with their link id or null), outputs (with the ids of their links) and
``widgets_values`` in the order ComfyUI's front end creates the widgets — the node's INPUT_TYPES order (required,
then optional), with the extra value the front end adds after a ``seed`` widget ("control_after_generate") and after
an image-upload combo (the upload button) — plus the ``links`` array ``[id, from node, from slot, to node, to slot,
type]``. Our nodes' inputs come from their INPUT_TYPES, the ComfyUI core nodes' from `CORE` below (checked against a
real ComfyUI's /object_info by tests/comfyui/test_comfyui_server.py). Layout: one column per graph depth, left to
right.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")

# The ComfyUI core nodes the examples use, as ComfyUI 0.3.64's INPUT_TYPES declare them (order matters: it is the
# widget order): inputs (name, type, options), outputs (name, type). "COMBO" stands for a list of choices.
CORE: dict[str, dict[str, list]] = {
    "CheckpointLoaderSimple": {
        "inputs": [("ckpt_name", "COMBO", {})],
        "outputs": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    },
    "CLIPTextEncode": {
        "inputs": [("text", "STRING", {"multiline": True}), ("clip", "CLIP", {})],
        "outputs": [("CONDITIONING", "CONDITIONING")],
    },
    "EmptyLatentImage": {
        "inputs": [("width", "INT", {}), ("height", "INT", {}), ("batch_size", "INT", {})],
        "outputs": [("LATENT", "LATENT")],
    },
    "KSampler": {
        "inputs": [("model", "MODEL", {}), ("seed", "INT", {"control_after_generate": True}), ("steps", "INT", {}),
                   ("cfg", "FLOAT", {}), ("sampler_name", "COMBO", {}), ("scheduler", "COMBO", {}),
                   ("positive", "CONDITIONING", {}), ("negative", "CONDITIONING", {}), ("latent_image", "LATENT", {}),
                   ("denoise", "FLOAT", {})],
        "outputs": [("LATENT", "LATENT")],
    },
    "VAEDecode": {
        "inputs": [("samples", "LATENT", {}), ("vae", "VAE", {})],
        "outputs": [("IMAGE", "IMAGE")],
    },
    "VAEEncode": {
        "inputs": [("pixels", "IMAGE", {}), ("vae", "VAE", {})],
        "outputs": [("LATENT", "LATENT")],
    },
    "LoadImage": {
        "inputs": [("image", "COMBO", {"image_upload": True})],
        "outputs": [("IMAGE", "IMAGE"), ("MASK", "MASK")],
    },
    "SaveImage": {
        "inputs": [("images", "IMAGE", {}), ("filename_prefix", "STRING", {})],
        "outputs": [],
    },
    "PreviewImage": {
        "inputs": [("images", "IMAGE", {})],
        "outputs": [],
    },
    "CheckpointSave": {
        "inputs": [("model", "MODEL", {}), ("clip", "CLIP", {}), ("vae", "VAE", {}), ("filename_prefix", "STRING", {})],
        "outputs": [],
    },
}


def import_pack(name: str = "lora_ops_pack"):
    """The repo root imported as ComfyUI imports a custom node (same module name as tests/helpers.import_pack)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def node_spec(class_type: str) -> dict[str, list]:
    """inputs [(name, type, options)] in widget order, outputs [(name, type)] of a core node or one of ours."""
    if class_type in CORE:
        return CORE[class_type]
    cls = import_pack().NODE_CLASS_MAPPINGS[class_type]
    types = cls.INPUT_TYPES()
    inputs = []
    for group in ("required", "optional"):
        for name, entry in types.get(group, {}).items():
            kind = entry[0] if isinstance(entry[0], str) else "COMBO"
            inputs.append((name, kind, dict(entry[1]) if len(entry) > 1 else {}))
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return {"inputs": inputs, "outputs": list(zip(names, cls.RETURN_TYPES, strict=True))}


def is_widget(kind: str) -> bool:
    return kind in WIDGET_TYPES


def widget_slots(inputs: list) -> list[tuple[str, str | None]]:
    """(input name, None) per widget, plus (input name, "control"/"upload") for the values the front end adds."""
    out = []
    for name, kind, options in inputs:
        if not is_widget(kind):
            continue
        out.append((name, None))
        if kind == "INT" and (name in ("seed", "noise_seed") or options.get("control_after_generate")):
            out.append((name, "control"))
        if options.get("image_upload"):
            out.append((name, "upload"))
    return out


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            links = [v[0] for v in api[node_id]["inputs"].values() if isinstance(v, list)]
            depth[node_id] = 1 + max((visit(src) for src in links), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    for node_id, node in api.items():  # a source sits in the column just before its first consumer
        consumers = [depth[other] for other, n in api.items()
                     if any(isinstance(v, list) and v[0] == node_id for v in n["inputs"].values())]
        if consumers and not any(isinstance(v, list) for v in node["inputs"].values()):
            depth[node_id] = min(consumers) - 1
    return depth


def _size(class_type: str, spec: dict, n_widgets: int) -> list[int]:
    sockets = sum(not is_widget(kind) for _, kind, _ in spec["inputs"])
    multiline = sum(bool(opts.get("multiline")) for _, kind, opts in spec["inputs"] if is_widget(kind))
    width = {"LoraOpsStack": 460, "LoraOpsTrain": 360, "CLIPTextEncode": 400}.get(class_type, 320)
    return [width, 30 + 22 * max(sockets, len(spec["outputs"])) + 24 * n_widgets + 70 * multiline]


def api_to_ui(api: dict) -> dict:
    """The LiteGraph (UI) workflow of an API-format graph."""
    ids = sorted(api, key=int)
    depth = _depths(api)
    order = sorted(ids, key=lambda i: (depth[i], int(i)))
    links, nodes = [], {}
    for node_id in ids:
        node = api[node_id]
        spec = node_spec(node["class_type"])
        values = []
        for name, extra in widget_slots(spec["inputs"]):
            if extra == "control":
                values.append("fixed")
            elif extra == "upload":
                values.append("image")
            else:
                values.append(node["inputs"][name])
        inputs = [{"name": name, "type": kind, "link": None}
                  for name, kind, _ in spec["inputs"] if not is_widget(kind)]
        outputs = [{"name": name, "type": kind, "links": [], "slot_index": slot}
                   for slot, (name, kind) in enumerate(spec["outputs"])]
        nodes[node_id] = {
            "id": int(node_id), "type": node["class_type"], "pos": [0, 0],
            "size": _size(node["class_type"], spec, len(values)), "flags": {}, "order": order.index(node_id),
            "mode": 0, "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": values,
        }
    for node_id in ids:  # links numbered in node, then input order
        for slot, entry in enumerate(nodes[node_id]["inputs"]):
            value = api[node_id]["inputs"].get(entry["name"])
            if isinstance(value, list):
                src, src_slot = value
                link_id = len(links) + 1
                kind = nodes[src]["outputs"][src_slot]["type"]
                links.append([link_id, int(src), src_slot, int(node_id), slot, kind])
                entry["link"] = link_id
                nodes[src]["outputs"][src_slot]["links"].append(link_id)
    for node in nodes.values():
        for out in node["outputs"]:
            out["links"] = out["links"] or None
    columns = range(max(depth.values()) + 1)
    widths = [max((nodes[i]["size"][0] for i in ids if depth[i] == d), default=0) for d in columns]
    tops: dict[int, int] = {}
    for node_id in order:  # one column per depth, left to right, stacked top to bottom
        d = depth[node_id]
        y = tops.get(d, 50)
        nodes[node_id]["pos"] = [50 + sum(w + 80 for w in widths[:d]), y]
        tops[d] = y + nodes[node_id]["size"][1] + 60
    return {
        "last_node_id": max(int(i) for i in ids), "last_link_id": len(links),
        "nodes": [nodes[i] for i in ids], "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4,
    }


def render(api_path: Path) -> str:
    return json.dumps(api_to_ui(json.loads(api_path.read_text(encoding="utf-8"))), indent=2, ensure_ascii=False) + "\n"


def ui_path(api_path: Path) -> Path:
    return api_path.with_name(api_path.name.removesuffix(".api.json") + ".json")


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for api_path in sorted(HERE.glob("*.api.json")):
        text, target = render(api_path), ui_path(api_path)
        if target.exists() and target.read_text(encoding="utf-8") == text:
            continue
        stale.append(target.name)
        if not check:
            target.write_text(text, encoding="utf-8")
    if stale:
        sys.stderr.write(("out of date: " if check else "wrote: ") + ", ".join(stale) + "\n")
    return 1 if check and stale else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
