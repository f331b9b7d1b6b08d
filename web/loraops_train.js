// LoRA Ops — live loss curve on the Train node.
// nodes/train_node.py sends `loraops.train.progress` after every optimizer step: {node, step, total, loss, lr};
// {node, step, total, reset: true} when a run (or a resumed run) starts and {node, done: true} when it ends. This
// extension draws, on every LoraOpsTrain node, a small canvas with the raw loss and a smoothed curve, and a line
// "step s/total · loss x". A new run clears the curve. Dependency-free; documented hooks only.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

export const TRAIN = "LoraOpsTrain";
export const EVENT = "loraops.train.progress";
const HEIGHT = 150;
const SMOOTHING = 0.9; // exponential moving average weight, debiased like TensorBoard's

/** A fresh run state. */
export function newRun(total = 0, start = 0) {
  return { steps: [], raw: [], smooth: [], total, start, lr: null, done: false, ema: 0, n: 0 };
}

/** Apply one progress message to a run state; returns the (possibly new) state. */
export function update(run, detail) {
  if (detail.reset) return newRun(detail.total ?? 0, detail.step ?? 0);
  if (detail.done) return { ...run, done: true };
  if (typeof detail.step !== "number" || typeof detail.loss !== "number") return run;
  const last = run.steps[run.steps.length - 1];
  // A step at or before the last one, or any step after a finished run, starts a new run.
  if (run.done || (last !== undefined && detail.step <= last)) run = newRun(detail.total ?? 0, detail.step - 1);
  const loss = detail.loss;
  const ema = Number.isFinite(loss) ? SMOOTHING * run.ema + (1 - SMOOTHING) * loss : run.ema;
  const n = Number.isFinite(loss) ? run.n + 1 : run.n;
  return {
    ...run,
    steps: [...run.steps, detail.step],
    raw: [...run.raw, loss],
    smooth: [...run.smooth, n ? ema / (1 - SMOOTHING ** n) : NaN],
    total: detail.total ?? run.total,
    lr: detail.lr ?? run.lr,
    ema,
    n,
  };
}

function fmt(x) {
  if (!Number.isFinite(x)) return String(x);
  return Math.abs(x) >= 1e-3 && Math.abs(x) < 1e4 ? x.toFixed(4) : x.toExponential(3);
}

/** The text line under the curve. */
export function label(run) {
  if (!run.steps.length) return run.total ? `step ${run.start}/${run.total} · starting…` : "no training run yet";
  const i = run.steps.length - 1;
  let text = `step ${run.steps[i]}/${run.total} · loss ${fmt(run.raw[i])}`;
  if (run.lr !== null) text += ` · lr ${run.lr.toExponential(2)}`;
  return run.done ? `${text} · done` : text;
}

function draw(canvas, run) {
  const ctx = canvas.getContext("2d");
  if (!ctx) return;
  const ratio = globalThis.devicePixelRatio || 1;
  const width = Math.max(120, canvas.clientWidth || 300);
  const height = HEIGHT;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = "rgba(0,0,0,0.25)";
  ctx.fillRect(0, 0, width, height);
  const values = run.raw.filter(Number.isFinite);
  if (!values.length) return;
  const pad = 6;
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
  const x0 = run.start;
  const x1 = Math.max(run.total || 0, run.steps[run.steps.length - 1], x0 + 1);
  const x = (step) => pad + ((step - x0) / (x1 - x0)) * (width - 2 * pad);
  const y = (loss) => height - pad - ((loss - lo) / (hi - lo)) * (height - 2 * pad);
  const line = (series, style, lineWidth) => {
    ctx.strokeStyle = style;
    ctx.lineWidth = lineWidth;
    ctx.beginPath();
    let pen = false;
    series.forEach((value, i) => {
      if (!Number.isFinite(value)) { pen = false; return; }
      if (pen) ctx.lineTo(x(run.steps[i]), y(value));
      else ctx.moveTo(x(run.steps[i]), y(value));
      pen = true;
    });
    ctx.stroke();
  };
  line(run.raw, "rgba(120,160,210,0.55)", 1);
  line(run.smooth, "rgb(240,160,48)", 2);
  ctx.fillStyle = "rgba(220,220,220,0.8)";
  ctx.font = "10px sans-serif";
  ctx.fillText(fmt(hi), pad + 2, pad + 9);
  ctx.fillText(fmt(lo), pad + 2, height - pad - 2);
}

function createView(node) {
  const container = document.createElement("div");
  container.className = "loraops-train";
  container.style.cssText = "display:flex;flex-direction:column;gap:2px;width:100%";
  const canvas = document.createElement("canvas");
  canvas.style.cssText = `width:100%;height:${HEIGHT}px;border-radius:4px`;
  const text = document.createElement("div");
  text.style.cssText = "font:11px monospace;opacity:.85;white-space:nowrap;overflow:hidden;text-overflow:ellipsis";
  container.append(canvas, text);
  const view = {
    run: newRun(),
    receive(detail) {
      view.run = update(view.run, detail);
      view.render();
    },
    render() {
      text.textContent = label(view.run);
      draw(canvas, view.run);
      node.setDirtyCanvas?.(true, false);
    },
  };
  node.addDOMWidget("loraops_loss", "loraops.loss", container, {
    serialize: false,
    getMinHeight: () => HEIGHT + 20,
  });
  if (globalThis.ResizeObserver) new ResizeObserver(() => draw(canvas, view.run)).observe(canvas);
  view.render();
  return view;
}

const views = new WeakMap(); // node → its view

function viewOf(node) {
  if (!views.has(node)) views.set(node, createView(node));
  return views.get(node);
}

app.registerExtension({
  name: "loraops.train",
  setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      if (!detail || detail.node === null || detail.node === undefined) return;
      // The server sends the node's id as a string (its UNIQUE_ID); the graph knows it as a number.
      const node = app.graph?.getNodeById?.(Number(detail.node)) ?? app.graph?.getNodeById?.(detail.node);
      if (node?.comfyClass !== TRAIN) return;
      viewOf(node).receive(detail);
    });
  },
  nodeCreated(node) {
    if (node.comfyClass === TRAIN) viewOf(node);
  },
});
