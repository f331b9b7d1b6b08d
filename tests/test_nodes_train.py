"""Train LoRA (LoRA Ops) without ComfyUI: the node on the tiny SD 1.5-shaped diffusers pipeline value.

The node's ComfyUI side (LATENT + CONDITIONING, progress bar, interrupt, resume) runs in tests/comfyui/.
"""

import importlib

import pytest
import torch
from helpers import import_pack

pack = import_pack()
nodes = pack.nodes
comfy_env = nodes.comfy_env
tiny = importlib.import_module(pack.__name__ + ".lora_ops.testing.tiny")
train_node = importlib.import_module(pack.__name__ + ".nodes.train_node")
DiffusersModel = nodes.diffusers_model.DiffusersModel
LoraValueError = pack.lora_ops.errors.LoraValueError

SETTINGS = dict(rank=4, alpha=0.0, learning_rate=1e-2, batch_size=2, seed=1, targets="attention",
                lr_scheduler="constant", warmup_steps=0)


@pytest.fixture
def output(tmp_path):
    comfy_env.configure(output=tmp_path / "output", input=tmp_path / "input")
    yield tmp_path / "output"


@pytest.fixture(scope="module")
def model():
    return DiffusersModel(tiny.tiny_sd1_pipeline())


def red_squares(n=4, size=64):
    """An IMAGE batch (B, H, W, 3) in [0, 1]: a red square on grey, shifted a little per image."""
    images = torch.full((n, size, size, 3), 0.5)
    for i in range(n):
        images[i, 16 + 2 * i : 48 + 2 * i, 16:48] = torch.tensor([0.9, 0.1, 0.1])
    return images


def sample(value, prompt="sks, a red square"):
    with value.activated() as pipe:
        return pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images


def test_train_node_from_images_on_a_diffusers_model(model, output):
    before = sample(model)
    lora, new_model, plot, report = train_node.LoraOpsTrain().train(
        model, 6, **SETTINGS, run_name="style", resume=False, images=red_squares(), captions="a red square",
        trigger_word="sks", resolution=64)
    assert len(lora.layers) > 0 and all(k.startswith("unet.") for k in lora.layers)
    assert lora.metadata["ss_max_train_steps"] == "6" and "sks" in lora.metadata["ss_tag_frequency"]
    assert torch.equal(sample(model), before)  # the input MODEL is unchanged after training
    assert len(new_model.items) == 1 and new_model.items[0][0] is lora
    assert not torch.allclose(sample(new_model), before, atol=1e-4)  # the returned MODEL carries the LoRA
    run = output / "loras" / "style_00001"
    assert (run / "style.safetensors").is_file() and (run / "style.loss.png").is_file()
    assert plot.ndim == 4 and plot.shape[-1] == 3 and "6/6 steps" in report and "4 images used" in report
    # a second run never overwrites the first: it gets the next folder
    train_node.LoraOpsTrain().train(model, 1, **SETTINGS, run_name="style", resume=False, images=red_squares(2),
                                    captions="a red square", resolution=64)
    assert sorted(p.name for p in (output / "loras").iterdir()) == ["style_00001", "style_00002"]


def test_train_node_from_latents_with_captions(model, output):
    latents = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    lora = train_node.LoraOpsTrain().train(model, 2, **SETTINGS, run_name="lat", resume=False, latents=latents,
                                           captions="one\ntwo")[0]
    assert lora.metadata["ss_num_train_images"] == "2"


def test_train_node_refuses_bad_inputs(model, output):
    node = train_node.LoraOpsTrain()
    with pytest.raises(LoraValueError, match="exactly one of"):
        node.train(model, 1, **SETTINGS, run_name="x", resume=False, captions="a")
    with pytest.raises(LoraValueError, match="CONDITIONING"):
        node.train(model, 1, **SETTINGS, run_name="x", resume=False, images=red_squares(1),
                   positive=[[torch.zeros(1, 77, 32), {}]])
    with pytest.raises(LoraValueError, match="2 images but 3 captions"):
        node.train(model, 1, **SETTINGS, run_name="x", resume=False, images=red_squares(2), captions="a\nb\nc")
    with pytest.raises(LoraValueError, match="no earlier run"):
        node.train(model, 1, **SETTINGS, run_name="x", resume=True, images=red_squares(1), captions="a")
    for hostile in ("../../x", "a/b", "", "/abs"):
        assert "plain name" in train_node.LoraOpsTrain.VALIDATE_INPUTS(run_name=hostile)
        with pytest.raises(LoraValueError, match="plain name"):
            node.train(model, 1, **SETTINGS, run_name=hostile, resume=False, images=red_squares(1), captions="a")
    assert not any(output.rglob("*.safetensors"))


def test_train_node_from_a_kohya_folder_in_the_input_folder(model, output):
    from PIL import Image

    data = output.parent / "input" / "style" / "3_red"
    data.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 48), (200, 30, 30)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("a red square")
    (data / "broken.png").write_bytes(b"not a png")
    (data / "broken.txt").write_text("broken")
    lora, _, _, report = train_node.LoraOpsTrain().train(model, 2, **SETTINGS, run_name="folder", resume=False,
                                                         data_folder="style", resolution=64)
    assert lora.metadata["ss_num_train_images"] == "6"  # 2 images × 3 repeats
    assert "2 images used, 1 left out" in report and "broken.png" in report
    changed = train_node.LoraOpsTrain.IS_CHANGED(data_folder="style")
    assert changed == train_node.LoraOpsTrain.IS_CHANGED(data_folder="style")
    (data / "0.txt").write_text("a red square, again")
    assert train_node.LoraOpsTrain.IS_CHANGED(data_folder="style") != changed
    assert train_node.LoraOpsTrain.IS_CHANGED(data_folder="") == ""
    with pytest.raises(pack.lora_ops.errors.LoraFileError, match="outside the allowed folder"):
        train_node.LoraOpsTrain().train(model, 1, **SETTINGS, run_name="x", resume=False, data_folder="../output")
