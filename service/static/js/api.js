// The API client of the page: same origin, JSON in and out, RFC 7807 problems as errors, and
// the admin key (kept in this tab's sessionStorage) sent as a bearer token when set.

const KEY_ITEM = "regcl.adminKey";

export function adminKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

export function setAdminKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

export class ApiError extends Error {
  constructor(status, problem) {
    const title = problem.title || `HTTP ${status}`;
    super(problem.detail ? `${title}: ${problem.detail}` : title);
    this.status = status;
    this.problem = problem;
  }
}

// api("/v1/x", {method, json, form}) -> parsed JSON body (throws ApiError on 4xx/5xx).
export async function api(path, { method = "GET", json, form } = {}) {
  const headers = {};
  const key = adminKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form !== undefined) {
    body = form;
  }
  const response = await fetch(path, { method, headers, body });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { detail: text.slice(0, 200) };
  }
  if (!response.ok) throw new ApiError(response.status, data || {});
  return data;
}

export function fmt(value, digits = 3) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
}

// Set the text of a status line; `error` marks it as an error for the eye and for tests.
export function say(element, text, error = false) {
  element.textContent = text;
  element.classList.toggle("error", error);
}

// Build an element: el("td", {className: "num"}, "text", child, ...).
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("aria") || name === "role" || name === "scope") {
      node.setAttribute(name.replace(/^aria([A-Z])/, (_, c) => `aria-${c.toLowerCase()}`),
                        value);
    } else node[name] = value;
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}
