// LoRA Ops — the Stack node's rows editor.
// The node's `rows` STRING widget (JSON) stays the single source of truth: it is what the workflow saves and what
// the Python node reads. This extension draws it as a list with add / remove / reorder, an enable toggle and two
// strengths per row, and shows a LoRA's metadata and trigger words from GET /loraops/info.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const STACK = "LoraOpsStack";
let loraNames = [];

function parseRows(text) {
  try {
    const rows = JSON.parse(text || "[]");
    return Array.isArray(rows) ? rows : [];
  } catch {
    return [];
  }
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
}

function numberInput(value, onChange, title) {
  const input = el("input", { type: "number", step: "0.05", value: String(value ?? 1), title });
  input.style.width = "4.5em";
  input.addEventListener("change", () => onChange(parseFloat(input.value)));
  return input;
}

async function showInfo(name, target) {
  target.textContent = "…";
  try {
    const res = await api.fetchApi(`/loraops/info?name=${encodeURIComponent(name)}`);
    const body = await res.json();
    if (!res.ok) {
      target.textContent = body.error ?? `error ${res.status}`;
      return;
    }
    const words = body.trigger_words?.length ? body.trigger_words.join(", ") : "none";
    target.textContent = `${body.format} · ${body.family ?? "unknown family"} · ${body.layers} layers · trigger words: ${words}`;
  } catch (err) {
    target.textContent = String(err);
  }
}

function render(node, rowsWidget, container) {
  const rows = parseRows(rowsWidget.value);
  const save = () => {
    rowsWidget.value = JSON.stringify(rows);
    render(node, rowsWidget, container);
    node.setDirtyCanvas(true, true);
  };
  container.replaceChildren();
  rows.forEach((row, i) => {
    const info = el("div", { className: "loraops-info" });
    info.style.cssText = "font-size:10px;opacity:.75;padding-left:1.6em";
    const enabled = el("input", { type: "checkbox", checked: row.enabled !== false, title: "enabled" });
    enabled.addEventListener("change", () => { row.enabled = enabled.checked; save(); });
    const select = el("select", { title: "LoRA file" });
    for (const name of new Set([...loraNames, row.lora])) {
      select.append(el("option", { value: name, textContent: name, selected: name === row.lora }));
    }
    select.style.maxWidth = "12em";
    select.addEventListener("change", () => { row.lora = select.value; save(); });
    const button = (label, title, fn) => {
      const b = el("button", { textContent: label, title });
      b.addEventListener("click", fn);
      return b;
    };
    const line = el(
      "div",
      { className: "loraops-row" },
      enabled,
      select,
      numberInput(row.strength_model, (v) => { row.strength_model = v; save(); }, "model strength"),
      numberInput(row.strength_clip, (v) => { row.strength_clip = v; save(); }, "text-encoder strength"),
      button("↑", "move up", () => { if (i > 0) { [rows[i - 1], rows[i]] = [rows[i], rows[i - 1]]; save(); } }),
      button("↓", "move down", () => { if (i < rows.length - 1) { [rows[i + 1], rows[i]] = [rows[i], rows[i + 1]]; save(); } }),
      button("✕", "remove", () => { rows.splice(i, 1); save(); }),
      button("ⓘ", "metadata and trigger words", () => showInfo(row.lora, info)),
    );
    line.style.cssText = "display:flex;gap:4px;align-items:center;margin:2px 0";
    container.append(line, info);
  });
  const add = el("button", { textContent: "+ Add LoRA" });
  add.addEventListener("click", () => {
    rows.push({ lora: loraNames[0] ?? "", enabled: true, strength_model: 1.0, strength_clip: 1.0 });
    save();
  });
  container.append(add);
}

app.registerExtension({
  name: "loraops.stack",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === "LoraOpsLoad") {
      loraNames = nodeData.input?.required?.lora_name?.[0] ?? [];
    }
  },
  nodeCreated(node) {
    if (node.comfyClass !== STACK) return;
    const rowsWidget = node.widgets?.find((w) => w.name === "rows");
    if (!rowsWidget) return;
    if (rowsWidget.element) rowsWidget.element.style.display = "none";
    const container = el("div", { className: "loraops-stack" });
    node.addDOMWidget("loraops_rows", "loraops.rows", container, { serialize: false });
    render(node, rowsWidget, container);
    // A loaded workflow sets the widget value after creation: redraw then.
    const onConfigure = node.onConfigure;
    node.onConfigure = function (...args) {
      const result = onConfigure?.apply(this, args);
      render(node, rowsWidget, container);
      return result;
    };
  },
});
