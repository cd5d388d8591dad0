// Machines list: keeps the rows' state, power, image and deploy progress current by polling the
// session's JSON view of the same page (machines.json) and editing the rows in place. A
// machine's page: keeps its progress current from view.json, and reloads when its state changes.
// Without this script the pages show the state at load. Served from the region (the CSP allows no
// inline script).
"use strict";
(function () {
  const table = document.getElementById("machines");
  const live = document.getElementById("machine-live");
  const anchor = table || live;
  if (!anchor) return;
  const source = anchor.dataset.src;
  const pollMs = Number(anchor.dataset.pollMs) || 2000;

  // The same words as the region's human_bytes and progress_text.
  function humanBytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = n, unit = 0;
    while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
    return unit === 0 ? n + " B" : value.toFixed(1) + " " + units[unit];
  }
  function percent(p) {
    if (!p.bytes_total) return 0;
    return Math.floor(Math.min(p.bytes_done, p.bytes_total) * 100 / p.bytes_total);
  }
  function progressText(p) {
    return percent(p) + " % · " + humanBytes(p.bytes_done) + " of " + humanBytes(p.bytes_total) +
      " · " + humanBytes(p.rate_bytes_per_s) + "/s";
  }
  function progressDetail(p) {
    return p.phase + " · " + humanBytes(p.bytes_fetched) + " fetched, " + humanBytes(p.bytes_written) +
      " written, " + humanBytes(p.bytes_skipped) + " already there, " + p.chunks_refetched + " chunks fetched again";
  }
  function label(state) {
    const words = state.replace(/_/g, " ");
    return words.charAt(0).toUpperCase() + words.slice(1);
  }
  function stateText(m) {
    return m.state === "allocated" && m.queue_position ? "Allocated (queue " + m.queue_position + ")" : label(m.state);
  }
  function stateClass(state) {
    if (state === "ready" || state === "deployed") return "online";
    if (state === "new") return "offline";
    if (state.startsWith("failed_") || state === "broken") return "failed";
    return "stale";
  }

  function update(m) {
    const row = table.querySelector("tr[data-machine='" + m.id + "']");
    if (!row) return;
    const badge = row.querySelector("td.state .badge");
    badge.textContent = stateText(m);
    badge.dataset.state = m.state;
    badge.className = "badge " + stateClass(m.state);
    row.querySelector("td.power").textContent = m.power_state;
    row.querySelector("td.image").textContent = m.image ? m.image.image + " " + m.image.arch + " " + m.image.version : "";
    const cell = row.querySelector("td.progress");
    if (m.state === "deploying" && m.progress) {
      let bar = cell.querySelector("progress");
      let text = cell.querySelector(".progress-text");
      if (!bar) {
        bar = document.createElement("progress");
        bar.max = 100;
        text = document.createElement("span");
        text.className = "progress-text";
        cell.replaceChildren(bar, text);
      }
      bar.value = percent(m.progress);
      text.textContent = progressText(m.progress);
    } else {
      cell.replaceChildren();
    }
  }

  // A machine's page: the progress in place; a new state changes the actions, so load the page
  // again (by GET: this page may be the answer to a form, which a reload would send again).
  function updateMachine(m) {
    if (m.state !== live.dataset.state) {
      window.location.assign(live.dataset.page);
      return false;
    }
    const cell = document.getElementById("machine-progress");
    if (cell && m.progress) {
      const bar = document.createElement("progress");
      bar.max = 100;
      bar.value = percent(m.progress);
      const text = document.createElement("span");
      text.className = "progress-text";
      text.textContent = progressText(m.progress);
      const detail = document.createElement("div");
      detail.className = "muted progress-detail";
      detail.textContent = progressDetail(m.progress);
      cell.replaceChildren(bar, text, detail);
    }
    return true;
  }

  async function poll() {
    try {
      const response = await fetch(source, { credentials: "same-origin", headers: { Accept: "application/json" } });
      const type = response.headers.get("Content-Type") || "";
      // A lapsed session answers with the login page: stop and leave the page as it is.
      if (!type.startsWith("application/json")) return;
      if (response.ok) {
        const body = await response.json();
        if (table) body.machines.forEach(update);
        else if (!updateMachine(body)) return;
      }
    } catch (error) {
      // The region is restarting or the network dropped: try again at the next tick.
    }
    setTimeout(poll, pollMs);
  }
  setTimeout(poll, pollMs);
})();
