"""The front-end files in web/: parse-level contract checks, and with Node.js installed a syntax check of each file
and a run of the Train node's loss-curve extension against stand-ins for ComfyUI's app/api modules and the DOM.

ComfyUI loads every web/*.js as an ES module from /extensions/<pack>/, so the only imports allowed are ComfyUI's own
``../../scripts/app.js`` / ``../../scripts/api.js`` (no dependencies); every file registers one extension named
``loraops.*`` through ``app.registerExtension`` (no prototype patching).
"""

import importlib
import json
import pathlib
import re
import shutil
import subprocess

import pytest
from helpers import import_pack

pack = import_pack()
WEB = pathlib.Path(__file__).resolve().parent.parent / "web"
FILES = sorted(WEB.glob("*.js"))
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="Node.js is not installed")


def test_every_file_is_a_dependency_free_loraops_extension():
    names = []
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        imports = re.findall(r"""^\s*import\s[^;]*?from\s+["']([^"']+)["']""", text, flags=re.M)
        assert set(imports) <= {"../../scripts/app.js", "../../scripts/api.js"}, (path.name, imports)
        assert not re.search(r"\brequire\(|\bimport\(", text), path.name
        found = re.findall(r"""app\.registerExtension\(\{\s*name:\s*["']([^"']+)["']""", text)
        assert len(found) == 1 and found[0].startswith("loraops."), (path.name, found)
        assert ".prototype" not in text, f"{path.name} patches a prototype"
        names += found
    assert len(names) == len(set(names))


def test_the_train_extension_listens_to_what_the_train_node_sends():
    text = (WEB / "loraops_train.js").read_text(encoding="utf-8")
    train_node = importlib.import_module(f"{pack.__name__}.nodes.train_node")
    assert f'export const EVENT = "{train_node.EVENT}";' in text
    assert 'export const TRAIN = "LoraOpsTrain";' in text and "LoraOpsTrain" in pack.NODE_CLASS_MAPPINGS
    assert 'name: "loraops.train"' in text and "api.addEventListener(EVENT" in text and "addDOMWidget(" in text


@needs_node
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_node_syntax_check(path, tmp_path):
    module = tmp_path / (path.stem + ".mjs")  # --check reads .js as CommonJS; these are ES modules
    module.write_bytes(path.read_bytes())
    result = subprocess.run([NODE, "--check", str(module)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


APP_STUB = """
export const registered = [];
export const nodes = new Map();
export const app = {
  registerExtension(e) { registered.push(e); },
  graph: { getNodeById: (id) => nodes.get(id) ?? null },
};
"""
API_STUB = """
export const listeners = {};
export const api = { addEventListener(type, fn) { (listeners[type] ??= []).push(fn); } };
"""
HARNESS = """
function element(tag) {
  const el = { tag, style: {}, children: [], textContent: "", clientWidth: 300 };
  el.append = (...c) => el.children.push(...c);
  if (tag === "canvas") {  // a 2D context whose every method is a no-op
    const ctx = { };
    el.getContext = () => new Proxy(ctx, { get: (t, k) => (k in t ? t[k] : () => {}) });
  }
  return el;
}
globalThis.document = { createElement: element };
const { registered, nodes } = await import("./scripts/app.js");
const { listeners } = await import("./scripts/api.js");
const mod = await import("./extensions/lora_ops/loraops_train.js");
const ext = registered[0];
ext.setup?.();
const widgets = [];
const node = { id: 7, comfyClass: "LoraOpsTrain", setDirtyCanvas() {},
  addDOMWidget(name, type, el, opts) { widgets.push({ name, type, el, serialize: opts?.serialize }); } };
ext.nodeCreated(node);
nodes.set(7, node);
ext.nodeCreated({ id: 8, comfyClass: "KSampler", addDOMWidget() { throw new Error("not a Train node"); } });
const send = (detail) => (listeners[mod.EVENT] ?? []).forEach((fn) => fn({ detail }));
const text = () => widgets[0].el.children[1].textContent;
const labels = [text()];
send({ node: "7", step: 0, total: 3, reset: true }); labels.push(text());
send({ node: "7", step: 1, total: 3, loss: 0.5, lr: 0.001 });
send({ node: "7", step: 2, total: 3, loss: 0.25, lr: 0.001 }); labels.push(text());
send({ node: "7", done: true }); labels.push(text());
send({ node: "7", step: 1, total: 5, loss: 0.9, lr: 0.002 }); labels.push(text());
send({ node: "99", step: 1, total: 5, loss: 0.1 });
let run = mod.newRun(4);
for (const [step, loss] of [[1, 1.0], [2, 0.0], [3, NaN], [4, 0.0]]) run = mod.update(run, { step, total: 4, loss });
console.log(JSON.stringify({ name: ext.name, widgets: widgets.map(({ el, ...w }) => w), labels,
  steps: run.steps, smooth: run.smooth.map((v) => (Number.isFinite(v) ? v : null)) }));
"""


@needs_node
def test_the_loss_curve_follows_the_progress_messages(tmp_path):
    (tmp_path / "package.json").write_text('{"type": "module"}')
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "app.js").write_text(APP_STUB)
    (tmp_path / "scripts" / "api.js").write_text(API_STUB)
    target = tmp_path / "extensions" / "lora_ops"
    target.mkdir(parents=True)
    shutil.copy(WEB / "loraops_train.js", target / "loraops_train.js")
    (tmp_path / "harness.js").write_text(HARNESS)
    result = subprocess.run([NODE, str(tmp_path / "harness.js")], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["name"] == "loraops.train"
    assert out["widgets"] == [{"name": "loraops_loss", "type": "loraops.loss", "serialize": False}]  # one, not saved
    before, started, running, done, new_run = out["labels"]
    assert before == "no training run yet" and started == "step 0/3 · starting…"
    assert running == "step 2/3 · loss 0.2500 · lr 1.00e-3"
    assert done == running + " · done"
    assert new_run == "step 1/5 · loss 0.9000 · lr 2.00e-3"  # a step after a finished run starts a new curve
    assert out["steps"] == [1, 2, 3, 4]
    s = out["smooth"]  # debiased EMA: starts at the first loss, skips NaN, moves towards the later ones
    assert s[0] == 1.0 and 0 < s[1] < 1 and s[2] == s[1] and 0 < s[3] < s[1]
