// The segment view: open an image (uploaded once: POST /v1/images), add prompts with the
// mouse or the keyboard, and after each prompt POST /v1/segment by image id (the embedding is
// cached server side); show the chosen mask over the image with its predicted IoU, the
// multimask choices, an optional side-by-side with the base model, and downloads.

import { api, el, fmt, say } from "./api.js";
import { saveMask, withoutExifRotation } from "./files.js";
import { rleToMask } from "./rle.js";

const $ = (id) => document.getElementById(id);
const MASK_RGBA = [30, 144, 255, 150];
const COMPARE_RGBA = [255, 99, 71, 150];
const DRAG_PX = 6;
const SVG = "http://www.w3.org/2000/svg";

const state = {
  image: null,      // {id, width, height, bitmap, name}
  points: [],       // [{x, y, label}] in image pixels
  box: null,        // [x0, y0, x1, y1]
  boxCorner: null,  // first corner of a keyboard box
  cursor: null,     // keyboard cursor {x, y}
  undo: [],         // what each prompt changed, newest last: "point" or {box: the one before}
  result: null,     // the last SegmentResponse of the main pane
  selected: 0,
  compare: null,    // the last SegmentResponse of the compare pane
  seq: 0,
};

function status(text, error = false) {
  say($("segment-status"), text, error);
}

function adapterName() {
  return $("adapter-select").value;
}

function compareAdapter() {
  return adapterName() === "base" ? "live" : "base";
}

// -- image ------------------------------------------------------------------------------------

async function openImage(file) {
  if (!file) return;
  status(`Uploading ${file.name}…`);
  try {
    const form = new FormData();
    form.append("file", file, file.name);
    const info = await api("/v1/images", { method: "POST", form });
    const bitmap = await createImageBitmap(await withoutExifRotation(file));
    state.image = { id: info.image_id, width: info.width, height: info.height, bitmap,
                    name: file.name };
    state.points = [];
    state.undo = [];
    state.box = null;
    state.boxCorner = null;
    state.cursor = { x: info.width / 2, y: info.height / 2 };
    state.result = null;
    state.compare = null;
    for (const prefix of ["", "compare-"]) {
      const canvas = $(`${prefix}image-canvas`);
      canvas.width = info.width;
      canvas.height = info.height;
      canvas.getContext("2d").drawImage(bitmap, 0, 0, info.width, info.height);
      const mask = $(`${prefix}mask-canvas`);
      mask.width = info.width;
      mask.height = info.height;
      $(`${prefix}prompt-layer`).setAttribute("viewBox", `0 0 ${info.width} ${info.height}`);
    }
    $("drop-zone").dataset.empty = "false";
    $("stage").dataset.imageId = info.image_id;
    $("stage").setAttribute("aria-label", `Image ${file.name}, ${info.width} by ${info.height}` +
                            " pixels: click or use the keyboard to add prompts");
    clearMasks();
    drawPrompts();
    setState("ready");
    if (bitmap.width !== info.width || bitmap.height !== info.height) {
      // Sizes still differ: an EXIF header this page could not rewrite.
      status(`${file.name}: the browser shows it ${bitmap.width} × ${bitmap.height} but the ` +
             `server reads ${info.width} × ${info.height} (EXIF rotation?): masks will not ` +
             "line up with the picture.", true);
    } else {
      status(`${file.name}: ${info.width} × ${info.height}, id ` +
             `${info.image_id.slice(0, 12)}… — click on an object.`);
    }
    $("stage").focus();
  } catch (error) {
    status(`Could not open the image: ${error.message}`, true);
  }
}

function setState(value) {
  $("stage").dataset.state = value;
}

// -- prompts ----------------------------------------------------------------------------------

function toImage(event) {
  const rect = $("prompt-layer").getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * state.image.width;
  const y = ((event.clientY - rect.top) / rect.height) * state.image.height;
  const clamp = (v, hi) => Math.round(Math.min(Math.max(v, 0), hi) * 10) / 10;
  return { x: clamp(x, state.image.width), y: clamp(y, state.image.height) };
}

function addPoint(x, y, label) {
  state.points.push({ x, y, label });
  state.undo.push("point");
  promptsChanged();
}

function setBox(a, b) {
  const box = [Math.min(a.x, b.x), Math.min(a.y, b.y), Math.max(a.x, b.x), Math.max(a.y, b.y)];
  state.undo.push({ box: state.box });
  state.box = box;
  promptsChanged();
}

function undo() {
  const last = state.undo.pop();
  if (last === undefined) return;
  if (last === "point") state.points.pop();
  else state.box = last.box;
  promptsChanged();
}

function clearPrompts() {
  state.points = [];
  state.undo = [];
  state.box = null;
  state.boxCorner = null;
  promptsChanged();
}

function promptsChanged() {
  drawPrompts();
  segment();
}

function svgNode(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  return node;
}

function drawPrompts(dragBox = null) {
  if (!state.image) return;
  const scale = state.image.width / Math.max($("prompt-layer").getBoundingClientRect().width, 1);
  for (const id of ["prompt-layer", "compare-prompt-layer"]) {
    const layer = $(id);
    layer.replaceChildren();
    const boxes = [state.box, dragBox].filter(Boolean);
    for (const [x0, y0, x1, y1] of boxes) {
      layer.append(svgNode("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0,
                                     fill: "none", stroke: "#ffb300",
                                     "stroke-width": 2 * scale }));
    }
    for (const p of state.points) {
      layer.append(svgNode("circle", { cx: p.x, cy: p.y, r: 5 * scale,
                                       fill: p.label ? "#14a44d" : "#dc3545",
                                       stroke: "#fff", "stroke-width": 1.5 * scale }));
    }
    if (id === "prompt-layer" && state.cursor && document.activeElement === $("stage")) {
      const { x, y } = state.cursor;
      const r = 8 * scale;
      layer.append(svgNode("path", { d: `M${x - r} ${y}H${x + r}M${x} ${y - r}V${y + r}`,
                                     stroke: "#fff", "stroke-width": 1.5 * scale }));
      if (state.boxCorner) {
        const c = state.boxCorner;
        layer.append(svgNode("rect", { x: Math.min(c.x, x), y: Math.min(c.y, y),
                                       width: Math.abs(x - c.x), height: Math.abs(y - c.y),
                                       fill: "none", stroke: "#ffb300",
                                       "stroke-dasharray": `${4 * scale}`,
                                       "stroke-width": 1.5 * scale }));
      }
    }
  }
}

function installPointer() {
  const layer = $("prompt-layer");
  let start = null;
  layer.addEventListener("contextmenu", (event) => event.preventDefault());
  layer.addEventListener("pointerdown", (event) => {
    if (!state.image || (event.button !== 0 && event.button !== 2)) return;
    event.preventDefault();
    layer.setPointerCapture(event.pointerId);
    start = { ...toImage(event), button: event.button, cx: event.clientX, cy: event.clientY,
              dragging: false };
    $("stage").focus({ preventScroll: true });
  });
  layer.addEventListener("pointermove", (event) => {
    if (!start || start.button !== 0) return;
    if (Math.hypot(event.clientX - start.cx, event.clientY - start.cy) > DRAG_PX) {
      start.dragging = true;
    }
    if (start.dragging) {
      const p = toImage(event);
      drawPrompts([Math.min(start.x, p.x), Math.min(start.y, p.y),
                   Math.max(start.x, p.x), Math.max(start.y, p.y)]);
    }
  });
  layer.addEventListener("pointerup", (event) => {
    if (!start) return;
    const begun = start;
    start = null;
    if (begun.dragging) {
      setBox(begun, toImage(event));
    } else {
      const negative = begun.button === 2 || $("negative-toggle").checked;
      addPoint(begun.x, begun.y, negative ? 0 : 1);
    }
  });
  layer.addEventListener("pointercancel", () => { start = null; drawPrompts(); });
}

function installKeyboard() {
  const stage = $("stage");
  stage.addEventListener("focus", () => drawPrompts());
  stage.addEventListener("blur", () => drawPrompts());
  stage.addEventListener("keydown", (event) => {
    if (!state.image) return;
    const c = state.cursor;
    const step = (event.shiftKey ? 0.1 : 0.02) * Math.max(state.image.width, state.image.height);
    const moves = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
    let handled = true;
    if (moves[event.key]) {
      const [dx, dy] = moves[event.key];
      c.x = Math.min(Math.max(c.x + dx * step, 0), state.image.width);
      c.y = Math.min(Math.max(c.y + dy * step, 0), state.image.height);
      c.x = Math.round(c.x * 10) / 10;
      c.y = Math.round(c.y * 10) / 10;
      drawPrompts();
      say($("mask-info"), `Cursor at ${c.x.toFixed(0)}, ${c.y.toFixed(0)}`);
    } else if (event.key === "Enter" || event.key === " ") {
      const negative = event.shiftKey || $("negative-toggle").checked;
      addPoint(c.x, c.y, negative ? 0 : 1);
    } else if (event.key === "-") {
      addPoint(c.x, c.y, 0);
    } else if (event.key === "+") {
      addPoint(c.x, c.y, 1);
    } else if (event.key === "b" || event.key === "B") {
      if (state.boxCorner) {
        const corner = state.boxCorner;
        state.boxCorner = null;
        setBox(corner, c);
      } else {
        state.boxCorner = { ...c };
        drawPrompts();
      }
    } else {
      handled = false;
    }
    if (handled) event.preventDefault();
  });
  document.addEventListener("keydown", (event) => {
    if ($("view-segment").hidden || event.target.matches("input, select, textarea")) return;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.key === "Escape") clearPrompts();
    else if (event.key === "z" || event.key === "Z" || event.key === "Backspace") undo();
    else if (event.key === "n" || event.key === "N") {
      $("negative-toggle").checked = !$("negative-toggle").checked;
      status(`Clicks now add ${$("negative-toggle").checked ? "negative" : "positive"} points.`);
    } else return;
    event.preventDefault();
  });
}

// -- segmentation -----------------------------------------------------------------------------

function request(adapter) {
  const body = { image_id: state.image.id, adapter, multimask: $("multimask-toggle").checked,
                 format: "rle" };
  if (state.points.length) {
    body.points = state.points.map((p) => [p.x, p.y]);
    body.labels = state.points.map((p) => p.label);
  }
  if (state.box) body.box = state.box;
  return body;
}

function best(result) {
  let index = 0;
  result.masks.forEach((m, i) => { if (m.score > result.masks[index].score) index = i; });
  return index;
}

async function segment() {
  if (!state.image) return;
  const seq = ++state.seq;
  if (!state.points.length && !state.box) {
    state.result = null;
    state.compare = null;
    clearMasks();
    setState("ready");
    return;
  }
  const main = request(adapterName());
  const comparing = $("compare-toggle").checked;
  setState("busy");
  status("Segmenting…");
  try {
    const [result, compare] = await Promise.all([
      api("/v1/segment", { method: "POST", json: main }),
      comparing ? api("/v1/segment", { method: "POST", json: request(compareAdapter()) })
        : Promise.resolve(null),
    ]);
    if (seq !== state.seq) return; // a newer prompt is on its way
    state.result = result;
    state.compare = compare;
    state.selected = best(result);
    $("stage").dataset.request = JSON.stringify(main);
    render();
    setState("done");
    status(`${result.adapter_version}: ${result.masks.length} mask(s); embedding ` +
           `${result.cache_hit ? "from the cache" : "computed"}.`);
  } catch (error) {
    if (seq !== state.seq) return;
    setState("error");
    status(`Segmentation failed: ${error.message}`, true);
  }
}

function paint(canvas, rle, rgba) {
  const mask = rleToMask(rle);
  const [h, w] = rle.size;
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(w, h);
  for (let i = 0; i < mask.length; i += 1) {
    if (mask[i]) image.data.set(rgba, 4 * i);
  }
  ctx.putImageData(image, 0, 0);
  return mask;
}

function clearMasks() {
  for (const id of ["mask-canvas", "compare-mask-canvas"]) {
    const canvas = $(id);
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  }
  $("mask-choices").replaceChildren();
  say($("mask-info"), "");
  say($("compare-info"), "");
  $("download-png").disabled = true;
  $("download-rle").disabled = true;
  delete $("stage").dataset.maskIndex;
}

function caption(asked, served) {
  return asked === served ? asked : `${asked} (${served})`;
}

/** What adapter "auto" chose, in words: the domain adapter and its margin over the runner-up,
 * or the fallback to the live adapter and why (not confident, or unlike every domain). */
function describeRoute(route) {
  const number = (v) => (v === null ? "–" : fmt(v));
  const figures = `margin ${number(route.margin)} (≥ ${fmt(route.min_margin)} to take it), ` +
                  `novelty ${number(route.novelty)} (≤ ${fmt(route.max_novelty)})`;
  if (route.confident) return `auto → ${route.adapter_version}: confident; ${figures}`;
  if (route.best === null) {
    return `auto → ${route.adapter_version}: no domain adapter has statistics`;
  }
  return `auto → ${route.adapter_version}: not confident (best: ${route.best}); ${figures}`;
}

function describe(result, index) {
  const m = result.masks[index];
  return `${result.adapter_version} · mask ${index + 1} of ${result.masks.length} · ` +
         `predicted IoU ${fmt(m.score)} · ${m.area} px`;
}

function render() {
  const result = state.result;
  const index = state.selected;
  paint($("mask-canvas"), result.masks[index].rle, MASK_RGBA);
  const stage = $("stage");
  stage.dataset.maskIndex = String(index);
  stage.dataset.score = String(result.masks[index].score);
  stage.dataset.adapterVersion = result.adapter_version;
  $("main-caption").textContent = caption(adapterName(), result.adapter_version);
  const routeInfo = $("route-info");
  routeInfo.hidden = !result.route;
  routeInfo.textContent = result.route ? describeRoute(result.route) : "";
  if (result.route) stage.dataset.route = result.route.domain ?? "live";
  else delete stage.dataset.route;
  say($("mask-info"), describe(result, index));
  $("download-png").disabled = false;
  $("download-rle").disabled = false;

  const choices = result.masks.map((m, i) => el("button", {
    type: "button", role: "radio", ariaChecked: String(i === index),
    ariaLabel: `Mask ${i + 1}, predicted IoU ${fmt(m.score)}`, tabIndex: i === index ? 0 : -1,
    dataset: { index: String(i) }, onclick: () => choose(i),
  }, `Mask ${i + 1} · IoU ${fmt(m.score)}`));
  $("mask-choices").replaceChildren(...(choices.length > 1 ? choices : []));

  const pane = $("pane-compare");
  pane.hidden = !state.compare;
  if (state.compare) {
    const c = state.compare;
    const ci = Math.min(index, c.masks.length - 1);
    paint($("compare-mask-canvas"), c.masks[ci].rle, COMPARE_RGBA);
    $("compare-caption").textContent = caption(compareAdapter(), c.adapter_version);
    $("compare-stage").dataset.adapterVersion = c.adapter_version;
    say($("compare-info"), describe(c, ci));
  }
}

function choose(index) {
  if (!state.result || index < 0 || index >= state.result.masks.length) return;
  state.selected = index;
  render();
  $("mask-choices").querySelector(`[data-index="${index}"]`)?.focus();
}

function installChoices() {
  $("mask-choices").addEventListener("keydown", (event) => {
    const delta = { ArrowRight: 1, ArrowDown: 1, ArrowLeft: -1, ArrowUp: -1 }[event.key];
    if (!delta || !state.result) return;
    event.preventDefault();
    const n = state.result.masks.length;
    choose((state.selected + delta + n) % n);
  });
}

// -- downloads --------------------------------------------------------------------------------

function baseName() {
  const stem = (state.image?.name || "image").replace(/\.[^.]+$/, "");
  return `${stem}-mask${state.selected + 1}`;
}

function download(format) {
  if (state.result) saveMask(state.result.masks[state.selected].rle, baseName(), format);
}

// -- wiring -----------------------------------------------------------------------------------

export async function refreshAdapters() {
  const select = $("adapter-select");
  const current = select.value;
  try {
    const { adapters } = await api("/v1/adapters");
    const options = [el("option", { value: "live" }, "live (merged)"),
                     el("option", { value: "auto" }, "auto (the image's domain adapter)"),
                     el("option", { value: "base" }, "base (no adapter)"),
                     ...adapters.map((a) => el("option", { value: a.name },
                                               `adapter: ${a.name}` +
                                               (a.domain ? ` (${a.domain})` : "")))];
    select.replaceChildren(...options);
    select.value = [...select.options].some((o) => o.value === current) ? current : "live";
  } catch (error) {
    status(`Could not list the adapters: ${error.message}`, true);
  }
}

export function liveChanged() {
  // A new live version: masks from 'live' (and from 'auto', which falls back to it) are
  // stale, ask again.
  const followsLive = ["live", "auto"].includes(adapterName());
  if (state.result && (followsLive || $("compare-toggle").checked)) segment();
}

export function initSegment() {
  $("image-file").addEventListener("change", (event) => openImage(event.target.files[0]));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    openImage(event.dataTransfer.files[0]);
  });
  $("adapter-select").addEventListener("change", () => {
    $("compare-caption").textContent = compareAdapter();
    segment();
  });
  $("multimask-toggle").addEventListener("change", segment);
  $("compare-toggle").addEventListener("change", () => {
    $("pane-compare").hidden = !$("compare-toggle").checked;
    segment();
  });
  $("undo-prompt").addEventListener("click", undo);
  $("clear-prompts").addEventListener("click", clearPrompts);
  $("download-png").addEventListener("click", () => download("png"));
  $("download-rle").addEventListener("click", () => download("rle"));
  installPointer();
  installKeyboard();
  installChoices();
  window.addEventListener("resize", () => drawPrompts());
  refreshAdapters();
}
