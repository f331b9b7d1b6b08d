"""The node pack without ComfyUI: every node's contract, and each node's function on real files."""

import json

import pytest
from helpers import import_pack, sample_lora

from lora_ops.files import save_lora

pack = import_pack()
nodes = pack.nodes
comfy_env = nodes.comfy_env


@pytest.fixture
def folders(tmp_path):
    loras, output = tmp_path / "loras", tmp_path / "output"
    loras.mkdir()
    output.mkdir()
    comfy_env.configure(loras=[loras], output=output)
    save_lora(sample_lora("sd1", attention_only=True, metadata={"modelspec.trigger_phrase": "sks"}),
              loras / "a.safetensors", "kohya")
    save_lora(sample_lora("sd1", attention_only=True, seed=1), loras / "b.safetensors", "diffusers")
    yield loras, output
    comfy_env.configure(loras=[], output=None)


def test_every_node_honours_the_classic_contract(folders):
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("LoraOps")
        assert cls.CATEGORY.startswith("LoRA Ops")
        assert callable(getattr(cls(), cls.FUNCTION))
        assert isinstance(cls.RETURN_TYPES, tuple)
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), node_id
        spec = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, entry in spec.get(group, {}).items():
                assert len(entry) == 2 and entry[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_load_reports_and_validates(folders):
    load = nodes.LoraOpsLoad
    assert "a.safetensors" in load.INPUT_TYPES()["required"]["lora_name"][0]
    lora, info = load().load("a.safetensors")
    assert len(lora.layers) > 0 and "format: kohya" in info and "sks" in info
    assert "not found" in load.VALIDATE_INPUTS("nope.safetensors")
    assert load.VALIDATE_INPUTS("a.safetensors") is True
    with pytest.raises(pack.lora_ops.errors.LoraFileError, match="nope.safetensors"):
        load().load("nope.safetensors")


def test_is_changed_follows_file_content(folders):
    loras, _ = folders
    before = nodes.LoraOpsLoad.IS_CHANGED("a.safetensors")
    assert before == nodes.LoraOpsLoad.IS_CHANGED("a.safetensors")
    save_lora(sample_lora("sd1", attention_only=True, seed=5), loras / "a.safetensors", "kohya", overwrite=True)
    assert nodes.LoraOpsLoad.IS_CHANGED("a.safetensors") != before


def test_stack_rows_chain_and_validate(folders):
    rows = json.dumps([
        {"lora": "a.safetensors", "enabled": True, "strength_model": 0.7, "strength_clip": 0.2},
        {"lora": "b.safetensors", "enabled": False},
    ])
    (first,) = nodes.LoraOpsStack().stack(rows)
    assert [(e.name, e.strength_model, e.strength_clip) for e in first] == [("a.safetensors", 0.7, 0.2)]
    extra, _ = nodes.LoraOpsLoad().load("b.safetensors")
    (chained,) = nodes.LoraOpsStack().stack('[{"lora": "b.safetensors"}]', lora_stack=first, lora=extra,
                                            lora_strength_model=0.5)
    assert [e.name for e in chained] == ["a.safetensors", "b.safetensors", "lora input"]
    assert chained[-1].strength_model == 0.5
    assert "row 1" in nodes.LoraOpsStack.VALIDATE_INPUTS('[{"lora": "a.safetensors", "strength_model": "x"}]')
    assert "missing.safetensors" in nodes.LoraOpsStack.VALIDATE_INPUTS('[{"lora": "missing.safetensors"}]')


def test_save_writes_inside_output_only(folders):
    _, output = folders
    lora, _ = nodes.LoraOpsLoad().load("a.safetensors")
    result = nodes.LoraOpsSave().save(lora, "loras/mine", "comfyui", metadata="modelspec.title=Mine")
    rel = result["result"][0]
    assert rel == "loras/mine_00001_.safetensors" and (output / rel).is_file()
    assert nodes.LoraOpsSave().save(lora, "loras/mine", "kohya")["result"][0].endswith("mine_00002_.safetensors")
    saved = pack.lora_ops.files.load_lora(output / rel)
    assert saved.metadata["modelspec.title"] == "Mine" and saved.source_format == "comfyui"
    for hostile in ("../../x", "/tmp/evil", "loras/../../x"):
        with pytest.raises(pack.lora_ops.errors.LoraFileError, match="outside"):
            nodes.LoraOpsSave().save(lora, hostile, "kohya")
    assert not list(output.parent.glob("x*")) and sorted(p.name for p in output.rglob("*.safetensors")) == [
        "mine_00001_.safetensors", "mine_00002_.safetensors"]


def test_inspect_node_shows_text(folders):
    lora, _ = nodes.LoraOpsLoad().load("b.safetensors")
    out = nodes.LoraOpsInspect().inspect(lora)
    assert "format: diffusers" in out["result"][0] and out["ui"]["text"] == [out["result"][0]]
    image = out["result"][1]
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3 and 0 <= image.min() < image.max() <= 1


def test_layer_norms_come_from_the_factors():
    """The Inspect plot's ‖ΔW‖_F (no ΔW formed) equals the dense norm, for linear, conv and Tucker layers."""
    import torch

    from lora_ops.lora import LoRALayer
    from lora_ops.plots_inspect import delta_norm, layers_plot

    gen = torch.Generator().manual_seed(0)
    layers = [
        LoRALayer(down=torch.randn(4, 12, generator=gen), up=torch.randn(10, 4, generator=gen), alpha=2.0),
        LoRALayer(down=torch.randn(3, 6, 3, 3, generator=gen), up=torch.randn(8, 3, 1, 1, generator=gen), alpha=3.0),
        LoRALayer(down=torch.randn(3, 6, 1, 1, generator=gen), up=torch.randn(8, 3, 1, 1, generator=gen),
                  mid=torch.randn(3, 3, 3, 3, generator=gen), alpha=1.0),
    ]
    for layer in layers:
        dense = torch.linalg.matrix_norm(layer.delta(torch.float64).flatten(1))
        assert abs(delta_norm(layer) - float(dense)) <= 1e-9 * float(dense)
    lora = sample_lora("sd1", attention_only=True)
    assert layers_plot(lora).size[0] > 500


def test_info_route_reads_only_listed_files(folders):
    status, body = nodes.routes.lora_info("a.safetensors")
    assert status == 200 and body["format"] == "kohya" and "sks" in body["trigger_words"]
    for name in ("../a.safetensors", "/etc/passwd", "missing.safetensors"):
        status, body = nodes.routes.lora_info(name)
        assert status == 404 and "not in the loras folders" in body["error"]
    assert nodes.routes.register() is False  # no ComfyUI server here
