// The page's entry point: two views as tabs (keyboard: arrow keys between tabs), and the live
// adapter version in the header, polled and refreshed after each activation.

import { api } from "./api.js";
import { initManage, liveMoved, refreshManage } from "./manage.js";
import { initSegment, liveChanged, refreshAdapters } from "./segment.js";

const $ = (id) => document.getElementById(id);
const LIVE_POLL_MS = 4000;
let liveSeen;

async function refreshLive() {
  const badge = $("live-version");
  try {
    const live = await api("/v1/versions/live");
    const text = live.live_version === null ? "base (no version live)" :
      `v${live.live_version}` +
      (live.served_version !== live.live_version ? ` (serving ${live.adapter_version})` : "");
    badge.textContent = text;
    badge.dataset.version = live.live_version === null ? "" : String(live.live_version);
    badge.dataset.served = live.adapter_version;
    badge.title = live.last_swap_error || "";
    const key = `${live.live_version}/${live.served_version}`;
    if (liveSeen !== undefined && key !== liveSeen) {
      liveChanged();
      liveMoved();
    }
    liveSeen = key;
  } catch (error) {
    badge.textContent = "unavailable";
    badge.title = error.message;
  }
}

function selectTab(tab) {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const other of tabs) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  if (tab.id === "tab-manage") refreshManage();
  history.replaceState(null, "", tab.id === "tab-manage" ? "#manage" : "#segment");
}

function initTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const delta = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!delta) return;
      const next = tabs[(tabs.indexOf(tab) + delta + tabs.length) % tabs.length];
      next.focus();
      selectTab(next);
    });
  }
  if (location.hash === "#manage") selectTab($("tab-manage"));
}

initSegment();
initManage({
  adaptersChanged: refreshAdapters,
  liveChanged: () => refreshLive(),
});
initTabs();
refreshLive();
setInterval(refreshLive, LIVE_POLL_MS);
document.documentElement.dataset.ready = "true";
