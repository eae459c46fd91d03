// Masks decoded in this browser, when onnxruntime-web is installed next to the page
// (/ui/vendor/onnxruntime-web/, fetched from npm by `make vendor`; never from a CDN).
//
// Per image and adapter version the page fetches the embedding once
// (GET /v1/images/{id}/embedding, a .npy), and the prompt encoder + mask decoder once
// (GET /v1/models/decoder.onnx); every click then runs the decoder here. With each decode
// the embedding is revalidated (If-None-Match, in parallel with the decode): 304 (no body, no
// model work on the server) while it is current, or the new version's embedding after a hot
// swap, and the mask is shown only once its version is confirmed current, so a mask never
// comes from a version that is no longer served. The result has the shape of a POST /v1/segment
// answer (COCO RLE masks, scores, area, bbox, adapter_version), so the page draws and
// downloads it the same way. Without onnxruntime-web (or if the decoder cannot be had),
// segmentRequest() sends POST /v1/segment as before.
//
// The arithmetic is segment-anything's SamPredictor.predict: points scaled to the resized
// frame (input size / original size), a padding point (0, 0) labelled -1 when there is no
// box, box corners labelled 2 and 3; mask 0 when multimask is off, masks 1-3 when it is on.

import { adminKey, api, ApiError } from "./api.js";
import { maskToRle } from "./rle.js";

const ORT_DIR = "/ui/vendor/onnxruntime-web/";
const VERSION_HEADER = "X-Regcl-Adapter-Version";

let decoder = null;   // Promise of {ort, session} or null (server decoding)
const embeddings = new Map();  // "imageId|adapter" -> {etag, version, tensor, original, input}

function headers(extra = {}) {
  const key = adminKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function loadDecoder() {
  let ort;
  try {
    ort = await import(`${ORT_DIR}ort.wasm.min.mjs`);
  } catch {
    return null;  // not installed: decode on the server
  }
  ort.env.wasm.wasmPaths = ORT_DIR;
  ort.env.wasm.numThreads = 1;  // no cross-origin isolation here, so no wasm threads
  const response = await fetch("/v1/models/decoder.onnx", { headers: headers() });
  if (!response.ok) return null;  // e.g. 409: the decoder is not shared by every version
  const model = new Uint8Array(await response.arrayBuffer());
  const session = await ort.InferenceSession.create(model, { executionProviders: ["wasm"] });
  return { ort, session };
}

/** Start loading onnxruntime-web and the decoder (once); resolves to whether the page decodes
 * locally. */
export function initLocalDecoding() {
  if (decoder === null) {
    decoder = loadDecoder().catch((error) => {
      console.warn("local decoding unavailable, decoding on the server:", error);
      return null;
    });
  }
  return decoder.then((d) => d !== null);
}

function parseNpy(buffer) {
  const bytes = new Uint8Array(buffer);
  const view = new DataView(buffer);
  const major = bytes[6];
  const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
  const start = major === 1 ? 10 : 12;
  const header = new TextDecoder().decode(bytes.subarray(start, start + headerLength));
  if (!header.includes("'<f4'") || header.includes("'fortran_order': True")) {
    throw new Error(`unexpected embedding format: ${header}`);
  }
  const shape = header.match(/'shape': \(([^)]*)\)/)[1].split(",").filter((s) => s.trim())
    .map(Number);
  return { data: new Float32Array(buffer.slice(start + headerLength)), shape };
}

function size(text) {
  const [h, w] = text.split(",").map(Number);
  return [h, w];
}

/** The current embedding of image `imageId` under `adapter` (revalidated with its ETag). */
async function currentEmbedding(ort, imageId, adapter) {
  const key = `${imageId}|${adapter}`;
  const held = embeddings.get(key);
  const url = `/v1/images/${imageId}/embedding?adapter=${encodeURIComponent(adapter)}`;
  const response = await fetch(url, {
    headers: headers(held ? { "If-None-Match": held.etag } : {}), cache: "no-store" });
  if (response.status === 304 && held) return held;
  if (!response.ok) {
    let problem = {};
    try { problem = await response.json(); } catch { /* not JSON */ }
    throw new ApiError(response.status, problem);
  }
  const { data, shape } = parseNpy(await response.arrayBuffer());
  const fresh = { etag: response.headers.get("ETag"),
                  version: response.headers.get(VERSION_HEADER),
                  tensor: new ort.Tensor("float32", data, shape),
                  original: size(response.headers.get("X-Regcl-Original-Size")),
                  input: size(response.headers.get("X-Regcl-Input-Size")),
                  side: 4 * shape[2] };
  embeddings.set(key, fresh);
  return fresh;
}

function feeds(ort, emb, body) {
  const [h, w] = emb.original;
  const [ih, iw] = emb.input;
  const coords = [];
  const labels = [];
  (body.points || []).forEach(([x, y], i) => {
    coords.push(x * (iw / w), y * (ih / h));
    labels.push(body.labels ? body.labels[i] : 1);
  });
  if (body.box) {
    const [x0, y0, x1, y1] = body.box;
    coords.push(x0 * (iw / w), y0 * (ih / h), x1 * (iw / w), y1 * (ih / h));
    labels.push(2, 3);
  } else {
    coords.push(0, 0);
    labels.push(-1);
  }
  const n = labels.length;
  return {
    image_embeddings: emb.tensor,
    point_coords: new ort.Tensor("float32", Float32Array.from(coords), [1, n, 2]),
    point_labels: new ort.Tensor("float32", Float32Array.from(labels), [1, n]),
    mask_input: new ort.Tensor("float32", new Float32Array(emb.side * emb.side),
                               [1, 1, emb.side, emb.side]),
    has_mask_input: new ort.Tensor("float32", Float32Array.from([0]), [1]),
    orig_im_size: new ort.Tensor("float32", Float32Array.from([h, w]), [2]),
  };
}

function maskResult(logits, index, h, w, score) {
  const plane = logits.subarray(index * h * w, (index + 1) * h * w);
  const mask = new Uint8Array(h * w);
  let area = 0;
  let x0 = w;
  let y0 = h;
  let x1 = -1;
  let y1 = -1;
  for (let y = 0; y < h; y += 1) {
    for (let x = 0; x < w; x += 1) {
      if (plane[y * w + x] > 0) {
        mask[y * w + x] = 1;
        area += 1;
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        y1 = y;
      }
    }
  }
  const bbox = area ? [x0, y0, x1 - x0 + 1, y1 - y0 + 1] : [0, 0, 0, 0];
  return { score, area, bbox, rle: maskToRle(mask, h, w) };
}

async function decodeWith({ ort, session }, emb, body) {
  const started = performance.now();
  const out = await session.run(feeds(ort, emb, body));
  const [h, w] = emb.original;
  const logits = out.masks.data;
  const scores = out.iou_predictions.data;
  const picks = body.multimask ? [1, 2, 3] : [0];
  const masks = picks.map((i) => maskResult(logits, i, h, w, scores[i]));
  return { masks, adapter_version: emb.version, image_id: body.image_id, cache_hit: true,
           decoded: "browser", decode_ms: performance.now() - started };
}

async function decodeHere(local, body) {
  const held = embeddings.get(`${body.image_id}|${body.adapter}`);
  const check = currentEmbedding(local.ort, body.image_id, body.adapter);
  if (held === undefined) return decodeWith(local, await check, body);
  // Decode with the embedding at hand while the server confirms it is current; a mask is
  // only shown once it is (else it is decoded again from the new version's embedding).
  const [current, result] = await Promise.all([check, decodeWith(local, held, body)]);
  return current === held ? result : decodeWith(local, current, body);
}

/** Masks for a POST /v1/segment body (image_id, adapter, multimask, points/labels, box):
 * decoded here when onnxruntime-web is loaded, else by the server. `auto` always asks the
 * server: its answer carries the route (chosen adapter, margin) the page shows. */
export async function segmentRequest(body) {
  const local = decoder === null ? null : await decoder;
  if (local === null || body.mask_input !== undefined || body.image_id === undefined
      || body.adapter === "auto") {
    const result = await api("/v1/segment", { method: "POST", json: body });
    return { ...result, decoded: "server" };
  }
  return decodeHere(local, body);
}
