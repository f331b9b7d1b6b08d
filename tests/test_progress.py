"""Per-layer progress: callbacks see every layer, a raising callback (ComfyUI's Cancel) stops within one layer."""

import importlib
import sys
import types

import pytest
from helpers import import_pack, sample_lora

from lora_ops.combine import combine
from lora_ops.resize import resize


def test_callback_sees_every_layer():
    lora = sample_lora("sd1", rank=8, attention_only=True)
    seen = []
    resize(lora, 4, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(lora.layers), len(lora.layers)) and len(seen) >= len(lora.layers)
    seen.clear()
    combine([(lora, 1.0, 1.0)], "concat", progress=lambda done, total: seen.append(done))
    assert seen == list(range(1, len(lora.layers) + 1))


def test_cancel_stops_within_one_layer():
    lora = sample_lora("sd1", rank=8, attention_only=True)
    calls = []

    def cancel_at_three(done, total):
        calls.append(done)
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        resize(lora, 4, progress=cancel_at_three)
    assert calls == [1, 2, 3]


def test_nodes_drive_comfyuis_progress_bar_and_interrupt(monkeypatch):
    pack = import_pack()
    updates, state = [], {"interrupt_at": 5}

    class ProgressBar:
        def __init__(self, total):
            self.total = total

        def update_absolute(self, value, total=None):
            updates.append(value)

    def throw():
        if updates and updates[-1] >= state["interrupt_at"]:
            raise RuntimeError("Processing interrupted")

    comfy = types.ModuleType("comfy")
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.utils", types.SimpleNamespace(ProgressBar=ProgressBar))
    monkeypatch.setitem(sys.modules, "comfy.model_management",
                        types.SimpleNamespace(throw_exception_if_processing_interrupted=throw))
    fixtures = importlib.import_module(pack.__name__ + ".lora_ops.testing.fixtures")
    lora = fixtures.random_lora({"unet.a": (8, 8), "unet.b": (8, 8), "unet.c": (8, 8)}, rank=4)
    state["interrupt_at"] = 99
    pack.nodes.LoraOpsResize().resize(lora, "rank", 2.0, 0)
    assert updates[-1] == 3
    updates.clear()
    state["interrupt_at"] = 2
    with pytest.raises(RuntimeError, match="interrupted"):
        pack.nodes.LoraOpsResize().resize(lora, "rank", 2.0, 0)
    assert updates == [1, 2]
