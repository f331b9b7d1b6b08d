"""Every example workflow (API format) uses real node ids, real input names, and links of matching types."""

import json
import pathlib

import pytest
from helpers import import_pack

pack = import_pack()
WORKFLOWS = sorted((pathlib.Path(__file__).resolve().parent.parent / "examples" / "workflows").glob("*.api.json"))

# The ComfyUI core nodes the examples use: input name → type (a list: a widget), and output types.
CORE = {
    "CheckpointLoaderSimple": ({"ckpt_name": "COMBO"}, ("MODEL", "CLIP", "VAE")),
    "CLIPTextEncode": ({"text": "STRING", "clip": "CLIP"}, ("CONDITIONING",)),
    "EmptyLatentImage": ({"width": "INT", "height": "INT", "batch_size": "INT"}, ("LATENT",)),
    "KSampler": ({"model": "MODEL", "seed": "INT", "steps": "INT", "cfg": "FLOAT", "sampler_name": "COMBO",
                  "scheduler": "COMBO", "positive": "CONDITIONING", "negative": "CONDITIONING",
                  "latent_image": "LATENT", "denoise": "FLOAT"}, ("LATENT",)),
    "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, ("IMAGE",)),
    "SaveImage": ({"images": "IMAGE", "filename_prefix": "STRING"}, ()),
    "PreviewImage": ({"images": "IMAGE"}, ()),
    "CheckpointSave": ({"model": "MODEL", "clip": "CLIP", "vae": "VAE", "filename_prefix": "STRING"}, ()),
}


def spec(class_type):
    if class_type in CORE:
        return CORE[class_type]
    cls = pack.NODE_CLASS_MAPPINGS[class_type]
    types = cls.INPUT_TYPES()
    inputs = {name: entry[0] if isinstance(entry[0], str) else "COMBO"
              for group in ("required", "optional") for name, entry in types.get(group, {}).items()}
    return inputs, cls.RETURN_TYPES


def required_inputs(class_type):
    if class_type in CORE:
        return set(CORE[class_type][0])
    return set(pack.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()["required"])


def test_there_is_a_workflow_per_operation():
    names = {p.name.removesuffix(".api.json") for p in WORKFLOWS}
    assert {"load_and_apply", "stack", "combine", "resize", "merge_and_unload", "extract"} <= names


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
                assert inputs[name] not in ("MODEL", "CLIP", "VAE", "LORA", "LORA_STACK", "LATENT", "IMAGE",
                                            "CONDITIONING"), f"{path.name}: {node_id}.{name} needs a link"
