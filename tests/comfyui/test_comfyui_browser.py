"""The front end in a real browser: ComfyUI's own web app (the ``comfyui-frontend-package`` its requirements pin)
in headless Chromium, against the server of test_comfyui_server.py, with this pack's web/ extensions loaded.

Skipped unless ``COMFYUI_PATH`` is set (tests/comfyui/conftest.py) and ``playwright`` (the Python package only; its
own browser download is not used), the front-end package and a Chromium binary (``LORAOPS_CHROMIUM``, else
``chromium`` / ``chromium-browser`` / ``google-chrome`` on PATH; Debian: ``apt-get install chromium``) are all there.

What is asserted, through the page's own ``app`` and ``LiteGraph`` objects and clicks on our DOM elements:
- every web/*.js extension registers with ComfyUI's app, and loading the page logs no error from our files;
- a new LoRA Ops Stack node shows the rows editor in place of the raw JSON text box; "+ Add LoRA" adds rows with the
  first LoRA file of the server's list, a strength typed into a row, the enable toggle, reordering and removal all
  land in the node's ``rows`` widget (the value the workflow saves and the Python node reads);
- the info button shows the LoRA's format, family and layer count from ``GET /loraops/info``;
- ``app.graphToPrompt()`` sends that ``rows`` value as the node's input and the editor itself is not serialised
  (the workflow's ``widgets_values`` hold the rows JSON and the strengths, nothing else);
- loading examples/workflows/stack.json redraws the editor from the saved rows;
- the Train node's live loss curve follows a real run: examples/workflows/train_and_save.json loaded in the page,
  its API twin posted for the page's client id (as the page's Queue button does), and the node shows
  "step 3/3 · loss … · done" over a canvas with the smoothed curve drawn in its colour.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from .test_comfyui_server import for_test, get, server  # noqa: F401 — server: the module-scoped fixture

ROOT = Path(__file__).resolve().parents[2]
EXTENSIONS = {"loraops.core", "loraops.stack", "loraops.train"}
LOAD_TIMEOUT_MS = 60_000


def chromium_path() -> str | None:
    given = os.environ.get("LORAOPS_CHROMIUM")
    if given:
        return given
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


def _missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "pip install playwright (its browser download is not needed)"
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        return "pip install the comfyui-frontend-package version ComfyUI's requirements.txt pins"
    if chromium_path() is None:
        return "no Chromium: apt-get install chromium, or set LORAOPS_CHROMIUM"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=f"browser test: {_missing()}")


@pytest.fixture(scope="module")
def page(server):  # noqa: F811 — the fixture imported above
    """ComfyUI's page, loaded, with every console error and page exception recorded in ``page.problems``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1600, "height": 1000})
        problems: list[str] = []
        tab.on("pageerror", lambda err: problems.append(f"page error: {err}"))
        tab.on("console", lambda msg: problems.append(f"console.{msg.type}: {msg.text} ({msg.location})")
               if msg.type == "error" else None)
        tab.goto(server.url, timeout=LOAD_TIMEOUT_MS)
        tab.wait_for_function("window.app?.graph && window.LiteGraph && window.app.extensions?.length > 0",
                              timeout=LOAD_TIMEOUT_MS)
        close_dialogs(tab)
        tab.problems = problems
        yield tab
        browser.close()


def close_dialogs(page) -> None:
    """Dismiss what a first visit opens over the canvas (ComfyUI's template browser), as a user would: Escape."""
    for _ in range(5):
        if page.locator(".p-dialog-mask").count() == 0:
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(300)
    page.screenshot(path=str(Path(os.environ.get("TMPDIR", "/tmp")) / "loraops_dialog.png"))
    raise AssertionError("a dialog stays open over the canvas (screenshot: loraops_dialog.png)")


def rows_of(page, node_id: int) -> list[dict]:
    return json.loads(page.evaluate("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'rows').value",
                                    node_id))


def click(page, node_id: int, selector: str, index: int = 0) -> None:
    """A real click on one of our elements inside the node's rows editor."""
    locator = page.locator(f"[data-loraops-node='{node_id}'] {selector}").nth(index)
    locator.scroll_into_view_if_needed()
    locator.click()


def add_stack_node(page) -> int:
    node_id = page.evaluate("""() => {
        const node = LiteGraph.createNode("LoraOpsStack");
        node.pos = [120, 120];
        app.graph.add(node);
        app.canvas.ds.offset = [0, 0];
        app.canvas.ds.scale = 1;
        app.graph.setDirtyCanvas(true, true);
        const editor = node.widgets.find(w => w.name === "loraops_rows").element;
        editor.dataset.loraopsNode = String(node.id);
        return node.id;
    }""")
    page.wait_for_selector(f"[data-loraops-node='{node_id}'] button", state="visible", timeout=10_000)
    return node_id


def finished(url: str, prompt_id: str, timeout: float = 90) -> dict:
    """The prompt's history entry once the whole prompt has finished (the Train node ends before the Save node)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        entry = get(url, f"/history/{prompt_id}").get(prompt_id)
        if entry and entry.get("status", {}).get("status_str"):
            return entry
        time.sleep(0.2)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s")


def test_every_extension_registers_and_loads_without_errors(page):
    names = set(page.evaluate("() => app.extensions.map(e => e.name)"))
    assert EXTENSIONS <= names, sorted(names)
    ours = [p for p in page.problems if "lora_ops" in p or "loraops" in p]
    assert not ours, ours


def test_the_stack_editor_edits_the_rows_widget(page):
    node_id = add_stack_node(page)
    assert rows_of(page, node_id) == []
    hidden = page.evaluate("(id) => app.graph.getNodeById(id).widgets.find(w => w.name === 'rows').element?.style"
                           ".display", node_id)
    assert hidden == "none"  # the raw JSON box gives way to the editor

    click(page, node_id, "button:text('+ Add LoRA')")
    click(page, node_id, "button:text('+ Add LoRA')")
    rows = rows_of(page, node_id)
    assert len(rows) == 2 and all(r["enabled"] and r["strength_model"] == 1.0 for r in rows)
    assert [r["lora"] for r in rows] == ["my_character.safetensors"] * 2  # the first of ComfyUI's sorted list

    select = page.locator(f"[data-loraops-node='{node_id}'] select").nth(1)
    select.select_option("my_style.safetensors")
    strength = page.locator(f"[data-loraops-node='{node_id}'] input[title='model strength']").nth(1)
    strength.fill("0.35")
    strength.press("Tab")  # "change" fires when the field loses focus
    click(page, node_id, "input[title='enabled']", 0)
    rows = rows_of(page, node_id)
    assert rows[1] == {"lora": "my_style.safetensors", "enabled": True, "strength_model": 0.35, "strength_clip": 1.0}
    assert rows[0]["enabled"] is False

    click(page, node_id, "button[title='move up']", 1)
    assert [r["lora"] for r in rows_of(page, node_id)][0] == "my_style.safetensors"
    click(page, node_id, "button[title='remove']", 1)
    rows = rows_of(page, node_id)
    assert len(rows) == 1 and rows[0]["strength_model"] == 0.35

    click(page, node_id, "button[title='metadata and trigger words']", 0)
    info = page.locator(f"[data-loraops-node='{node_id}'] .loraops-info").nth(0)
    info.filter(has_text="layers").wait_for(timeout=10_000)
    assert "kohya" in info.inner_text() and "sd1" in info.inner_text()

    prompt = page.evaluate("async () => (await app.graphToPrompt())")
    sent = prompt["output"][str(node_id)]
    assert sent["class_type"] == "LoraOpsStack"
    assert json.loads(sent["inputs"]["rows"]) == rows
    saved = next(n for n in prompt["workflow"]["nodes"] if n["id"] == node_id)
    assert json.loads(saved["widgets_values"][0]) == rows
    assert not any(isinstance(v, dict) or v is None for v in saved["widgets_values"])  # the editor is not saved
    assert not [p for p in page.problems if "lora_ops" in p or "loraops" in p]


def test_a_loaded_workflow_redraws_the_editor(page):
    workflow = json.loads((ROOT / "examples" / "workflows" / "stack.json").read_text(encoding="utf-8"))
    saved = next(n for n in workflow["nodes"] if n["type"] == "LoraOpsStack")
    expected = json.loads(saved["widgets_values"][0])
    assert expected, "the example should carry rows"
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", workflow)
    node_id = saved["id"]
    page.evaluate("""(id) => {
        const node = app.graph.getNodeById(id);
        node.widgets.find(w => w.name === "loraops_rows").element.dataset.loraopsNode = String(id);
    }""", node_id)
    assert rows_of(page, node_id) == expected
    selects = page.locator(f"[data-loraops-node='{node_id}'] select")
    assert selects.count() == len(expected)
    assert [selects.nth(i).input_value() for i in range(len(expected))] == [r["lora"] for r in expected]


def test_the_train_nodes_loss_curve_follows_a_real_run(page, server):  # noqa: F811
    workflow = json.loads((ROOT / "examples" / "workflows" / "train_and_save.json").read_text(encoding="utf-8"))
    train_id = next(n["id"] for n in workflow["nodes"] if n["type"] == "LoraOpsTrain")
    page.evaluate("async (wf) => { await app.loadGraphData(wf); }", workflow)
    view = page.locator(".loraops-train")
    assert view.count() == 1 and "no training run yet" in view.inner_text()

    api_graph = json.loads((ROOT / "examples" / "workflows" / "train_and_save.api.json").read_text(encoding="utf-8"))
    graph = for_test(api_graph, random.randrange(1, 2**31 - 1))
    client_id = page.evaluate("async () => (await import('/scripts/api.js')).api.clientId")
    assert client_id
    body = json.dumps({"prompt": graph, "client_id": client_id}).encode()
    request = urllib.request.Request(server.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=20) as res:
        prompt_id = json.loads(res.read())["prompt_id"]
    view.filter(has_text="done").wait_for(timeout=90_000)
    assert finished(server.url, prompt_id)["status"]["status_str"] == "success"

    steps = graph[str(train_id)]["inputs"]["steps"]
    assert re.fullmatch(rf"step {steps}/{steps} · loss [0-9.e+-]+ · lr [0-9.e+-]+ · done", view.inner_text().strip())
    drawn = page.evaluate("""() => {
        const canvas = document.querySelector(".loraops-train canvas");
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        let curve = 0;  // pixels in the smoothed curve's colour, rgb(240, 160, 48)
        for (let i = 0; i < data.length; i += 4) {
            if (Math.abs(data[i] - 240) < 30 && Math.abs(data[i + 1] - 160) < 40 && data[i + 2] < 110) curve++;
        }
        return curve;
    }""")
    assert drawn > 20, f"only {drawn} pixels of the smoothed curve drawn"
    assert not [p for p in page.problems if "lora_ops" in p or "loraops" in p]
