"""The example workflows: API format (``X.api.json``) and UI format (``X.json``, what users drag into ComfyUI).

API files: real node ids, real input names, links of matching types. UI files: one per API file, every node type
exists, sockets and link types match the node definitions, ``widgets_values`` follow INPUT_TYPES' widget order and
count (plus the front end's "control_after_generate" value after a seed and the upload value of an image combo),
the UI graph read back is the API graph, and the file is exactly what examples/workflows/make_ui.py writes (so the
two formats cannot drift). The core-node table comes from make_ui.py; tests/comfyui/test_comfyui_server.py checks it
against a real ComfyUI's /object_info.
"""

import importlib.util
import json
import pathlib

import pytest
from helpers import import_pack

pack = import_pack()
FOLDER = pathlib.Path(__file__).resolve().parent.parent / "examples" / "workflows"
WORKFLOWS = sorted(FOLDER.glob("*.api.json"))
UI_WORKFLOWS = sorted(p for p in FOLDER.glob("*.json") if not p.name.endswith(".api.json"))
_spec = importlib.util.spec_from_file_location("loraops_make_ui", FOLDER / "make_ui.py")
make_ui = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_ui)
CORE = make_ui.CORE
SOCKET_ONLY = ("MODEL", "CLIP", "VAE", "LORA", "LORA_STACK", "LATENT", "IMAGE", "CONDITIONING", "MASK")


def spec(class_type):
    """input name → type ("COMBO" for a list of choices), and the output types."""
    if class_type in CORE:
        return {n: kind for n, kind, _ in CORE[class_type]["inputs"]}, tuple(k for _, k in CORE[class_type]["outputs"])
    cls = pack.NODE_CLASS_MAPPINGS[class_type]
    types = cls.INPUT_TYPES()
    inputs = {name: entry[0] if isinstance(entry[0], str) else "COMBO"
              for group in ("required", "optional") for name, entry in types.get(group, {}).items()}
    return inputs, cls.RETURN_TYPES


def required_inputs(class_type):
    if class_type in CORE:
        return {n for n, _, _ in CORE[class_type]["inputs"]}
    return set(pack.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()["required"])


def widgets(class_type):
    """[(input name, extra, entry)] in the order ComfyUI's front end creates the widgets of a node.

    Written from INPUT_TYPES here (not taken from make_ui) for our nodes: required then optional inputs, a widget for
    every INT/FLOAT/STRING/BOOLEAN or list-of-choices input, and the "control_after_generate" value after a seed.
    """
    if class_type in CORE:
        return [(n, extra, None) for n, extra in make_ui.widget_slots(CORE[class_type]["inputs"])]
    types = pack.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    out = []
    for group in ("required", "optional"):
        for name, entry in types.get(group, {}).items():
            if isinstance(entry[0], list) or entry[0] in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                out.append((name, None, entry))
                if entry[0] == "INT" and name in ("seed", "noise_seed"):
                    out.append((name, "control", entry))
    return out


def check_value(where, value, entry):
    """A widget value fits its INPUT_TYPES entry (type, range, choices)."""
    if entry is None:
        return
    kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
    if isinstance(kind, list):
        if kind:  # the loras dropdown is empty outside ComfyUI
            assert value in kind, f"{where}: {value!r} not in {kind}"
        return
    ok = {"INT": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "FLOAT": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "STRING": lambda v: isinstance(v, str), "BOOLEAN": lambda v: isinstance(v, bool)}[kind]
    assert ok(value), f"{where}: {value!r} is not {kind}"
    if kind in ("INT", "FLOAT"):
        assert options.get("min", value) <= value <= options.get("max", value), f"{where}: {value} out of range"


def ui_to_api(ui):
    """The API graph a UI workflow describes (the way ComfyUI's front end queues it)."""
    links = {link[0]: link for link in ui["links"]}
    out = {}
    for node in ui["nodes"]:
        inputs = {}
        slots = widgets(node["type"])
        assert len(node["widgets_values"]) == len(slots), f"node {node['id']} ({node['type']}): widget count"
        for (name, extra, _), value in zip(slots, node["widgets_values"], strict=True):
            if extra is None:
                inputs[name] = value
        for entry in node["inputs"]:
            if entry["link"] is not None:
                link = links[entry["link"]]
                inputs[entry["name"]] = [str(link[1]), link[2]]
        out[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return out


def test_there_is_a_workflow_per_operation():
    names = {p.name.removesuffix(".api.json") for p in WORKFLOWS}
    assert {"load_and_apply", "stack", "combine", "resize", "merge_and_unload", "train_and_save", "extract"} <= names


def test_every_api_workflow_has_its_ui_workflow():
    assert [make_ui.ui_path(p) for p in WORKFLOWS] == UI_WORKFLOWS


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_consistent(path):
    graph = json.loads(path.read_text())
    assert any(node["class_type"].startswith("LoraOps") for node in graph.values())
    for node_id, node in graph.items():
        ct = node["class_type"]
        assert ct in CORE or ct in pack.NODE_CLASS_MAPPINGS, f"{path.name}: unknown node {ct}"
        inputs, _ = spec(ct)
        missing = required_inputs(ct) - set(node["inputs"])
        assert not missing, f"{path.name} node {node_id} ({ct}) lacks {missing}"
        for name, value in node["inputs"].items():
            assert name in inputs, f"{path.name} node {node_id} ({ct}) has no input '{name}'"
            if isinstance(value, list):  # a link: [source node id, output index]
                source = graph[value[0]]
                out_types = spec(source["class_type"])[1]
                assert out_types[value[1]] == inputs[name], f"{path.name}: {node_id}.{name} gets {out_types[value[1]]}"
            else:
                assert inputs[name] not in SOCKET_ONLY, f"{path.name}: {node_id}.{name} needs a link"


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.name)
def test_ui_workflow_is_consistent(path):
    ui = json.loads(path.read_text(encoding="utf-8"))
    assert ui["version"] == 0.4 and isinstance(ui["links"], list) and ui["nodes"]
    nodes = {node["id"]: node for node in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] >= max(nodes)
    assert ui["last_link_id"] == max((link[0] for link in ui["links"]), default=0)
    for node in ui["nodes"]:
        ct, where = node["type"], f"{path.name} node {node['id']} ({node['type']})"
        assert ct in CORE or ct in pack.NODE_CLASS_MAPPINGS, f"{where}: unknown node type"
        assert len(node["pos"]) == 2 and len(node["size"]) == 2 and node["mode"] == 0
        inputs, outputs = spec(ct)
        sockets = [(name, kind) for name, kind in inputs.items() if kind not in make_ui.WIDGET_TYPES]
        assert [(e["name"], e["type"]) for e in node["inputs"]] == sockets, f"{where}: input sockets"
        assert tuple(e["type"] for e in node["outputs"]) == tuple(outputs), f"{where}: outputs"
        slots = widgets(ct)
        assert len(node["widgets_values"]) == len(slots), f"{where}: {len(node['widgets_values'])} widget values, " \
                                                          f"INPUT_TYPES has {len(slots)} ({[s[0] for s in slots]})"
        for (name, extra, entry), value in zip(slots, node["widgets_values"], strict=True):
            if extra == "control":
                assert value in ("fixed", "increment", "decrement", "randomize"), f"{where}.{name}: {value!r}"
            elif extra == "upload":
                assert value == "image", f"{where}.{name}: {value!r}"
            else:
                check_value(f"{where}.{name}", value, entry)
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        out, into = nodes[src]["outputs"][src_slot], nodes[dst]["inputs"][dst_slot]
        assert out["type"] == into["type"] == kind, f"{path.name} link {link_id}: {out['type']} → {into['type']}"
        assert link_id in (out["links"] or []) and into["link"] == link_id, f"{path.name} link {link_id}"
    used = {link[0] for link in ui["links"]}
    assert {e["link"] for n in ui["nodes"] for e in n["inputs"] if e["link"] is not None} == used
    assert {i for n in ui["nodes"] for e in n["outputs"] for i in (e["links"] or [])} == used


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_ui_and_api_workflows_describe_the_same_graph(path):
    api = json.loads(path.read_text(encoding="utf-8"))
    ui_file = make_ui.ui_path(path)
    assert ui_to_api(json.loads(ui_file.read_text(encoding="utf-8"))) == api
    assert ui_file.read_text(encoding="utf-8") == make_ui.render(path), (
        f"{ui_file.name} is out of date: run python examples/workflows/make_ui.py")
