// The domains and versions view: admin key, domain adapters with their scores, dataset upload
// and training, jobs followed live over server-sent events, merges, the version history with
// activation / rollback, and the continual matrix as a heat map.

import { adminKey, api, el, fmt, say, setAdminKey } from "./api.js";

const $ = (id) => document.getElementById(id);
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const JOB_EVENTS = ["snapshot", "created", "running", "progress", "succeeded", "failed",
                    "cancelled", "cancel_requested"];

const hooks = { adaptersChanged: () => {}, liveChanged: () => {} };
const jobs = new Map();      // id -> JobInfo
const following = new Map(); // id -> EventSource
const lastStep = new Map();  // id -> the last {step, total, loss} seen (later phases drop it)
let datasets = [];

function status(text, error = false) {
  say($("manage-status"), text, error);
}

async function attempt(what, action) {
  try {
    return await action();
  } catch (error) {
    status(`${what} failed: ${error.message}`, true);
    return undefined;
  }
}

// -- admin key --------------------------------------------------------------------------------

function showKeyState() {
  const set = Boolean(adminKey());
  $("key-state").textContent = set ? "Key set for this tab." : "No key: read-only.";
  $("admin-key").value = "";
  $("admin-key").placeholder = set ? "•••••••• (set)" : "needed to upload, train, merge, activate";
}

// -- adapters and merging ---------------------------------------------------------------------

function holdout(adapter, key) {
  const metrics = adapter.metadata?.metrics?.[key];
  return metrics && typeof metrics === "object" ? metrics.iou : undefined;
}

export async function refreshAdaptersTable() {
  const data = await attempt("Listing adapters", () => api("/v1/adapters"));
  if (!data) return;
  const checked = new Set([...document.querySelectorAll("#adapters-table input:checked")]
    .map((box) => box.value));
  const rows = data.adapters.map((a) => el("tr", { dataset: { adapter: a.name } },
    el("td", {}, el("input", { type: "checkbox", value: a.name, checked: checked.has(a.name),
                               ariaLabel: `Merge ${a.name}` })),
    el("th", { scope: "row" }, a.name),
    el("td", {}, a.domain || "–"),
    el("td", { className: "num" }, fmt(holdout(a, "holdout"))),
    el("td", { className: "num" }, fmt(holdout(a, "holdout_base"))),
    el("td", {}, a.has_stats ? "yes" : "no"),
    el("td", {}, a.metadata?.dataset?.name || "–"),
    el("td", {}, el("button", { type: "button", className: "evaluate",
                                onclick: () => evaluate({ adapter: a.name }) },
                    "Evaluate"))));
  if (!rows.length) {
    rows.push(el("tr", {}, el("td", { colSpan: 8, className: "hint" },
                              "No adapters yet: train one below, or upload one over the API.")));
  }
  $("adapters-table").tBodies[0].replaceChildren(...rows);
}

async function submitMerge(event) {
  event.preventDefault();
  const adapters = [...document.querySelectorAll("#adapters-table input:checked")]
    .map((box) => box.value);
  if (!adapters.length) {
    status("Select the adapters to merge first.", true);
    return;
  }
  const body = { adapters, method: $("merge-method").value,
                 activate: $("merge-activate").checked, fresh: $("merge-fresh").checked };
  const data = await attempt("Merge", () => api("/v1/jobs/merge", { method: "POST", json: body }));
  if (data) {
    status(`Merge job ${data.job.id.slice(0, 8)} queued.`);
    follow(data.job);
  }
}

// -- datasets and training --------------------------------------------------------------------

export async function refreshDatasets() {
  const data = await attempt("Listing datasets", () => api("/v1/datasets"));
  if (!data) return;
  datasets = data.datasets;
  const rows = datasets.map((d) => el("tr", { dataset: { dataset: d.name } },
    el("th", { scope: "row" }, d.name), el("td", {}, d.metadata?.domain || "–"),
    el("td", {}, d.format), el("td", { className: "num" }, String(d.count))));
  if (!rows.length) {
    rows.push(el("tr", {}, el("td", { colSpan: 4, className: "hint" }, "No datasets yet.")));
  }
  $("datasets-table").tBodies[0].replaceChildren(...rows);
  const select = $("train-dataset");
  const current = select.value;
  select.replaceChildren(...datasets.map((d) => el("option", { value: d.name }, d.name)));
  if (datasets.some((d) => d.name === current)) select.value = current;
  fillDomain();
}

function fillDomain() {
  const chosen = datasets.find((d) => d.name === $("train-dataset").value);
  if (chosen && !$("train-domain").dataset.edited) {
    $("train-domain").value = chosen.metadata?.domain || "";
  }
}

async function uploadDataset(event) {
  event.preventDefault();
  const file = $("dataset-file").files[0];
  const name = $("dataset-name").value.trim();
  const domain = $("dataset-domain").value.trim();
  const form = new FormData();
  form.append("name", name);
  form.append("file", file, file.name);
  if (domain) form.append("metadata", JSON.stringify({ domain }));
  status(`Uploading ${file.name}…`);
  const data = await attempt("Dataset upload",
                             () => api("/v1/datasets", { method: "POST", form }));
  if (data) {
    status(`Dataset ${data.name}: ${data.count} samples (${data.format}).`);
    $("dataset-form").reset();
    await refreshDatasets();
    $("train-dataset").value = data.name;
    delete $("train-domain").dataset.edited;
    fillDomain();
  }
}

function numberField(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

async function startTraining(event) {
  event.preventDefault();
  const params = { epochs: numberField("train-epochs"), rank: numberField("train-rank"),
                   batch_size: numberField("train-batch"),
                   max_samples: numberField("train-max-samples") };
  const adapter = $("train-adapter").value.trim();
  if (adapter) params.adapter = adapter;
  for (const key of Object.keys(params)) if (params[key] === undefined) delete params[key];
  const body = { dataset: $("train-dataset").value, domain: $("train-domain").value.trim(),
                 params };
  const data = await attempt("Training", () => api("/v1/jobs/train", { method: "POST",
                                                                        json: body }));
  if (data) {
    status(`Training job ${data.job.id.slice(0, 8)} queued.`);
    follow(data.job);
  }
}

// -- jobs -------------------------------------------------------------------------------------

function jobSummary(job) {
  if (job.error) return `${job.error.type}: ${job.error.message}`;
  const r = job.result;
  if (job.state === "succeeded" && r) {
    if (job.kind === "train") return `adapter ${r.adapter}, IoU ${fmt(r.metrics?.holdout?.iou)}`;
    if (job.kind === "merge") {
      return r.version == null ? "nothing merged" :
        `version ${r.version}${r.created ? "" : " (unchanged)"}` +
        `${r.activated ? ", activated" : ""}`;
    }
    if (job.kind === "evaluate") return `${r.target}`;
    if (job.kind === "stats") return `adapter ${r.adapter}`;
  }
  const d = job.detail || {};
  return [d.phase, d.adapter, d.dataset].filter(Boolean).join(" · ");
}

function jobRow(job) {
  const d = job.detail?.step != null ? job.detail : lastStep.get(job.id) || {};
  const progress = el("progress", { max: 1, value: job.progress,
                                    ariaLabel: `Job ${job.id.slice(0, 8)} progress` });
  return el("tr", { dataset: { jobId: job.id, state: job.state, kind: job.kind } },
    el("th", { scope: "row" }, el("code", {}, job.id.slice(0, 8))),
    el("td", {}, job.kind),
    el("td", { className: `state-${job.state}` }, job.state),
    el("td", {}, progress, ` ${Math.round(job.progress * 100)}%`),
    el("td", { className: "num step" }, d.step != null ? `${d.step}/${d.total}` : "–"),
    el("td", { className: "num loss" }, fmt(d.loss, 4)),
    el("td", {}, jobSummary(job), TERMINAL.has(job.state) || job.cancel_requested ? null :
       el("button", { type: "button", className: "cancel", onclick: () => cancel(job) },
          "Cancel")));
}

async function cancel(job) {
  const data = await attempt("Cancelling", () => api(`/v1/jobs/${job.id}/cancel`,
                                                     { method: "POST" }));
  if (data) update(data.job);
}

function renderJobs() {
  const list = [...jobs.values()].sort((a, b) => b.created_at.localeCompare(a.created_at))
    .slice(0, 20);
  const rows = list.map(jobRow);
  if (!rows.length) {
    rows.push(el("tr", {}, el("td", { colSpan: 7, className: "hint" }, "No jobs yet.")));
  }
  $("jobs-table").tBodies[0].replaceChildren(...rows);
}

function update(job) {
  const before = jobs.get(job.id);
  const d = job.detail || {};
  if (d.step != null) lastStep.set(job.id, { step: d.step, total: d.total, loss: d.loss });
  jobs.set(job.id, job);
  renderJobs();
  if (TERMINAL.has(job.state) && (!before || !TERMINAL.has(before.state))) finished(job);
}

function finished(job) {
  const source = following.get(job.id);
  if (source) {
    source.close();
    following.delete(job.id);
  }
  status(`${job.kind} job ${job.id.slice(0, 8)} ${job.state}` +
         (job.error ? `: ${job.error.message}` : "."), job.state === "failed");
  if (job.state !== "succeeded") return;
  if (job.kind === "train" || job.kind === "stats") {
    refreshAdaptersTable();
    hooks.adaptersChanged();
  }
  if (job.kind === "merge") {
    refreshVersions();
    if (job.result?.activated) hooks.liveChanged();
  }
  if (job.kind === "evaluate") refreshMatrix();
}

// Follow a job over server-sent events (no key needed to read them) until it ends.
function follow(job) {
  update(job);
  if (TERMINAL.has(job.state) || following.has(job.id)) return;
  const source = new EventSource(`/v1/jobs/${job.id}/events`);
  following.set(job.id, source);
  const onEvent = (event) => {
    const data = JSON.parse(event.data);
    if (data.job) update(data.job);
  };
  for (const name of JOB_EVENTS) source.addEventListener(name, onEvent);
  source.onerror = async () => {
    // The stream ended or broke: read the record once; reconnecting resumes if still running.
    const fresh = await api(`/v1/jobs/${job.id}`).catch(() => null);
    if (fresh) update(fresh);
  };
}

export async function refreshJobs() {
  const data = await attempt("Listing jobs", () => api("/v1/jobs?limit=20"));
  if (!data) return;
  for (const job of data.jobs) {
    if (TERMINAL.has(job.state)) jobs.set(job.id, job);
    else follow(job);
  }
  renderJobs();
}

// -- versions ---------------------------------------------------------------------------------

function scoreText(scores, name) {
  const s = scores?.[name];
  return s && typeof s === "object" ? ` ${fmt(s.iou)}` : "";
}

export async function refreshVersions() {
  const data = await attempt("Listing versions", () => api("/v1/versions"));
  if (!data) return;
  const live = data.live_version;
  const rows = [...data.versions].reverse().map((v) => {
    const lineage = v.lineage || {};
    const domains = (lineage.domains || []).map((name) =>
      el("span", { className: "domain" }, `${name}${scoreText(lineage.scores, name)}`));
    const parts = [];
    domains.forEach((d, i) => parts.push(...(i ? [", ", d] : [d])));
    const actions = el("td", {});
    if (!v.live) {
      const label = live !== null && v.number < live ? `Roll back to v${v.number}` :
        `Activate v${v.number}`;
      actions.append(el("button", { type: "button", className: "activate",
                                    onclick: () => activate(v.number) }, label), " ");
    }
    actions.append(el("button", { type: "button", className: "evaluate",
                                  onclick: () => evaluate({ version: v.number }) },
                      `Evaluate v${v.number}`));
    return el("tr", { className: v.live ? "live" : "", dataset: { version: String(v.number) } },
      el("th", { scope: "row" }, `v${v.number}`,
         v.live ? el("span", { className: "badge" }, "live") : null),
      el("td", {}, lineage.parent != null ? `v${lineage.parent}` : "–"),
      el("td", {}, lineage.method || "–"),
      el("td", {}, ...parts),
      el("td", {}, new Date(v.created_at).toLocaleString()),
      actions);
  });
  if (!rows.length) {
    rows.push(el("tr", {}, el("td", { colSpan: 6, className: "hint" },
                              "No versions yet: merge adapters above.")));
  }
  $("versions-table").tBodies[0].replaceChildren(...rows);
}

async function activate(number) {
  const data = await attempt(`Activating v${number}`, () =>
    api(`/v1/versions/${number}/activate`, { method: "POST" }));
  if (data) {
    const before = data.previous_version == null ? "base" : `v${data.previous_version}`;
    status(`v${number} is live (was ${before}).`);
    await refreshVersions();
    hooks.liveChanged();
    refreshMatrix();
  }
}

async function evaluate(target) {
  if (!datasets.length) {
    status("Upload a dataset to evaluate on first.", true);
    return;
  }
  const body = { datasets: datasets.slice(0, 16).map((d) => d.name), ...target };
  const data = await attempt("Evaluation", () => api("/v1/jobs/evaluate", { method: "POST",
                                                                           json: body }));
  if (data) {
    status(`Evaluation job ${data.job.id.slice(0, 8)} queued.`);
    follow(data.job);
  }
}

// -- continual matrix -------------------------------------------------------------------------

function heat(iou, low, high) {
  // The table's lowest score -> pale, its highest -> deep blue (all pale-to-mid when they are
  // within 0.01: no contrast out of noise); white text on dark cells.
  const span = high - low;
  const t = span > 0.01 ? (iou - low) / span : Math.min(Math.max(iou, 0), 1) * 0.5;
  return { background: `hsl(214, 80%, ${Math.round(96 - 60 * t)}%)`,
           color: t > 0.55 ? "#fff" : "#1b1f24" };
}

function rowLabel(row) {
  if (row.version != null) return `v${row.version}`;
  if (row.adapter) return `adapter ${row.adapter}`;
  return row.target;
}

export async function refreshMatrix() {
  const data = await attempt("Reading the continual matrix", () => api("/v1/versions/matrix"));
  if (!data) return;
  const table = $("matrix-table");
  const head = el("tr", {}, el("th", { scope: "col" }, "model \\ dataset"),
    ...data.columns.map((c) => el("th", { scope: "col" }, c.dataset,
                                  c.domain && c.domain !== c.dataset ?
                                    el("span", { className: "hint" }, ` (${c.domain})`) : null)),
    el("th", { scope: "col" }, "mean"));
  table.tHead.replaceChildren(head);
  const all = data.rows.flatMap((row) => Object.values(row.scores).map((cell) => cell.iou));
  const low = Math.min(...all);
  const high = Math.max(...all);
  const rows = data.rows.map((row) => {
    const values = [];
    const cells = data.columns.map((c) => {
      const cell = row.scores[c.dataset];
      if (!cell) return el("td", { className: "cell empty" }, "·");
      values.push(cell.iou);
      const td = el("td", { className: "cell", title: `${cell.count ?? "?"} samples, job ` +
                            `${cell.job_id.slice(0, 8)}`, dataset: { iou: String(cell.iou) } },
                    fmt(cell.iou));
      Object.assign(td.style, heat(cell.iou, low, high));
      return td;
    });
    const mean = values.length ? values.reduce((a, b) => a + b, 0) / values.length : undefined;
    return el("tr", { className: row.live ? "live" : "", dataset: { target: row.target } },
      el("th", { scope: "row" }, rowLabel(row),
         row.live ? el("span", { className: "badge" }, "live") : null),
      ...cells, el("td", { className: "cell num" }, fmt(mean)));
  });
  if (!rows.length) {
    rows.push(el("tr", {}, el("td", { className: "hint" },
                              "No evaluations yet: use “Evaluate” on a version.")));
  }
  table.tBodies[0].replaceChildren(...rows);
}

// -- wiring -----------------------------------------------------------------------------------

// The live version changed (here or elsewhere): the live marks move.
export function liveMoved() {
  if ($("view-manage").hidden) return;
  refreshVersions();
  refreshMatrix();
}

export function refreshManage() {
  refreshAdaptersTable();
  refreshDatasets();
  refreshJobs();
  refreshVersions();
  refreshMatrix();
}

export function initManage({ adaptersChanged, liveChanged }) {
  hooks.adaptersChanged = adaptersChanged;
  hooks.liveChanged = liveChanged;
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setAdminKey($("admin-key").value.trim());
    showKeyState();
    status(adminKey() ? "Admin key set." : "Admin key cleared.");
  });
  $("forget-key").addEventListener("click", () => {
    setAdminKey("");
    showKeyState();
    status("Admin key cleared.");
  });
  $("merge-form").addEventListener("submit", submitMerge);
  $("dataset-form").addEventListener("submit", uploadDataset);
  $("train-form").addEventListener("submit", startTraining);
  $("train-dataset").addEventListener("change", () => {
    delete $("train-domain").dataset.edited;
    fillDomain();
  });
  $("train-domain").addEventListener("input", () => { $("train-domain").dataset.edited = "1"; });
  $("evaluate-base").addEventListener("click", () => evaluate({}));
  $("refresh-matrix").addEventListener("click", refreshMatrix);
  showKeyState();
}
