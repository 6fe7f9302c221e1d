// The on-call dashboard (virtwarden/api/ui): reads and acts through the /v1 API with the
// token typed in; every value is written as text, never as HTML.
"use strict";

const state = {
  token: sessionStorage.getItem("virtwarden-token"), tab: "fleet", domain: null, following: null, timer: null,
};
const $ = (id) => document.getElementById(id);

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = { error: text }; }
  if (!r.ok) throw new ApiError(r.status, (data && data.error) || `${r.status} ${r.statusText}`);
  return data;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  const s = Math.max(0, Math.round(seconds));
  if (s < 120) return `${s} s ago`;
  if (s < 7200) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

function when(iso) { return iso ? iso.replace("T", " ").replace(/\.\d+/, "").replace("+00:00", "") : ""; }

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function showError(e) {
  const text = e instanceof ApiError && e.status === 403 ? `Not allowed with this token: ${e.message}`
    : e instanceof ApiError && e.status === 401 ? "The token was refused; sign in again." : String(e.message || e);
  $("error").textContent = text;
  if (e instanceof ApiError && e.status === 401) signOut();
}

// --- pages -------------------------------------------------------------------------------
async function loadFleet() {
  const rows = await api("GET", "/v1/overview");
  const body = $("fleet-rows");
  body.replaceChildren();
  let stale = 0, failing = 0;
  for (const d of rows) {
    const tr = document.createElement("tr");
    tr.dataset.domain = d.domain;
    const name = cell(tr, "", "name");
    const link = document.createElement("a");
    link.href = "#";
    link.textContent = d.domain;
    link.dataset.action = "points";
    link.addEventListener("click", (ev) => { ev.preventDefault(); state.domain = d.domain; show("points"); });
    name.appendChild(link);
    cell(tr, d.host);
    cell(tr, d.policy || (d.policy_error ? `error: ${d.policy_error}` : "none"), d.policy_error ? "bad" : "");
    const old = d.last_good_backup_age_seconds === null || d.last_good_backup_age_seconds > 26 * 3600;
    if (old) stale++;
    cell(tr, d.last_good_backup_at ? `${when(d.last_good_backup_at)} (${age(d.last_good_backup_age_seconds)})`
      : "never", old ? "bad" : "good");
    cell(tr, when(d.next_backup_at) || "on events only");
    const failed = d.last_backup_state === "failed";
    if (failed) failing++;
    cell(tr, d.last_backup_state || "", failed ? "bad" : "").title = d.last_backup_error || "";
    cell(tr, d.last_drill_state ? `${d.last_drill_state} ${when(d.last_drill_at)}` : "none",
      d.last_drill_state === "failed" ? "bad" : d.last_drill_state === "passed" ? "good" : "");
    cell(tr, d.points ? `${bytes(d.stored_bytes)} in ${d.points} point(s)` : "");
    const actions = cell(tr, "");
    if (d.points) {
      actions.append(button("Drill", "drill", () => drill(d.domain)), " ",
        button("Restore…", "restore", () => restore(d.domain)), " ",
        button("Points", "points", () => { state.domain = d.domain; show("points"); }));
    }
    body.appendChild(tr);
  }
  $("fleet-summary").textContent =
    `${rows.length} domain(s); ${stale} without a good backup in 26 h; ${failing} whose last backup failed`;
}

function button(text, action, handler) {
  const b = document.createElement("button");
  b.textContent = text;
  b.dataset.action = action;
  b.addEventListener("click", handler);
  return b;
}

async function loadPoints() {
  const rows = await api("GET", `/v1/domains/${encodeURIComponent(state.domain)}/restore-points`);
  $("points-domain").textContent = state.domain;
  const body = $("point-rows");
  body.replaceChildren();
  for (const p of rows.slice().reverse()) {
    const tr = document.createElement("tr");
    tr.dataset.point = p.id;
    cell(tr, p.id.slice(0, 8), "mono").title = p.id;
    cell(tr, when(p.created_at));
    cell(tr, p.level);
    cell(tr, p.status, p.status === "complete" ? "good" : p.status === "damaged" || p.status === "failed" ? "bad" : "");
    cell(tr, p.consistency);
    cell(tr, p.storage);
    cell(tr, bytes(p.size_bytes));
    const actions = cell(tr, "");
    if (p.status === "complete") {
      actions.append(button("Restore…", "restore", () => restore(state.domain, p.id)), " ",
        button("Drill", "drill", () => drill(state.domain, p.id)));
    }
    body.appendChild(tr);
  }
}

async function loadJobs() {
  const rows = await api("GET", "/v1/jobs?limit=100");
  const body = $("job-rows");
  body.replaceChildren();
  for (const j of rows) {
    const tr = document.createElement("tr");
    tr.dataset.job = j.id;
    tr.dataset.state = j.state;
    if (j.id === state.following) tr.className = "followed";
    cell(tr, j.id.slice(0, 8), "mono").title = j.id;
    cell(tr, j.kind);
    cell(tr, j.domain);
    cell(tr, j.host);
    cell(tr, j.state, j.state === "failed" ? "bad" : j.state === "succeeded" ? "good" : "busy");
    const p = cell(tr, "");
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = j.state === "succeeded" ? 1 : j.progress || 0;
    p.append(bar, ` ${Math.round((j.state === "succeeded" ? 1 : j.progress || 0) * 100)}%`);
    cell(tr, when(j.created_at));
    cell(tr, j.error || j.progress_text || "", j.error ? "bad note" : "note");
    body.appendChild(tr);
  }
}

async function loadDrills() {
  const rows = await api("GET", "/v1/drills?limit=100");
  const body = $("drill-rows");
  body.replaceChildren();
  for (const d of rows) {
    const tr = document.createElement("tr");
    tr.dataset.job = d.job_id;
    cell(tr, d.job_id.slice(0, 8), "mono").title = d.job_id;
    cell(tr, d.domain);
    cell(tr, (d.point_id || "").slice(0, 8), "mono");
    cell(tr, d.state, d.state === "failed" ? "bad" : d.state === "passed" ? "good" : "busy");
    cell(tr, d.restore_seconds === null ? "" : `${d.restore_seconds.toFixed(1)} s`);
    cell(tr, d.boot_seconds === null ? "" : `${d.boot_seconds.toFixed(1)} s`);
    cell(tr, (d.checks || []).map((c) => `${c.name}: ${c.outcome || c.ok}`).join(", "));
    cell(tr, when(d.started_at));
    body.appendChild(tr);
  }
}

async function loadAlerts() {
  const rows = await api("GET", "/v1/alerts?limit=100");
  const body = $("alert-rows");
  body.replaceChildren();
  for (const a of rows.slice().reverse()) {
    const tr = document.createElement("tr");
    cell(tr, when(a.received_at));
    cell(tr, a.name);
    cell(tr, a.host);
    cell(tr, a.status);
    cell(tr, a.outcome, a.outcome === "error" || a.outcome === "refused" ? "bad" : "");
    cell(tr, a.job_id ? a.job_id.slice(0, 8) : "", "mono");
    cell(tr, a.detail, "note");
    body.appendChild(tr);
  }
}

async function loadRunbooks() {
  const list = $("runbook-list");
  if (list.dataset.loaded) return;  // its forms keep what was typed into them
  const books = await api("GET", "/v1/runbooks");
  list.replaceChildren();
  for (const b of books) {
    const box = document.createElement("form");
    box.className = "runbook";
    box.dataset.runbook = b.name;
    const title = document.createElement("h3");
    title.textContent = `${b.name}${b.builtin ? "" : ` (${b.source})`}`;
    const about = document.createElement("p");
    about.textContent = `${b.description} — ${b.steps.map((st) => st.action).join(", then ")}`;
    box.append(title, about);
    for (const [key, p] of Object.entries(b.params)) {
      const label = document.createElement("label");
      label.textContent = `${key}${p.required ? " *" : ""} `;
      const input = document.createElement("input");
      input.name = key;
      input.value = p.default === null || p.default === undefined ? "" : String(p.default);
      input.title = p.help || "";
      input.placeholder = p.help || "";
      label.appendChild(input);
      box.appendChild(label);
    }
    const go = button("Run…", "run", () => {});
    go.type = "submit";
    box.appendChild(go);
    box.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const params = {};
      for (const input of box.querySelectorAll("input")) if (input.value !== "") params[input.name] = input.value;
      act(`/v1/runbooks/${encodeURIComponent(b.name)}/runs`, { params }, `Run ${b.name}`, "Run the runbook");
    });
    list.appendChild(box);
  }
  list.dataset.loaded = "yes";
}

const pages = {
  fleet: loadFleet, points: loadPoints, jobs: loadJobs, drills: loadDrills, alerts: loadAlerts, runbooks: loadRunbooks,
};

async function refresh() {
  try {
    await pages[state.tab]();
    if (state.following) await follow();
    $("error").textContent = "";
  } catch (e) {
    showError(e);
  }
}

function show(tab) {
  state.tab = tab;
  for (const name of Object.keys(pages)) $(name).hidden = name !== tab;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("current", b.dataset.tab === tab);
  refresh();
}

// --- actions: each shows its dry-run plan and asks first ---------------------------------
function confirmPlan(title, plan, go) {
  $("confirm-title").textContent = title;
  $("confirm-plan").textContent = JSON.stringify(plan, null, 2);
  $("confirm-go").textContent = go;
  const dialog = $("confirm");
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "go"), { once: true });
    dialog.showModal();
  });
}

async function act(path, body, title, go) {
  try {
    const planned = await api("POST", `${path}?dry_run=true`, body);
    if (!(await confirmPlan(title, planned.plan, go))) return;
    const started = await api("POST", path, body);
    state.following = started.job_id;
    show("jobs");
  } catch (e) {
    showError(e);
  }
}

function drill(domain, point) {
  return act("/v1/drills", point ? { domain, point } : { domain }, `Drill ${domain}`, "Start the drill");
}

function restore(domain, point) {
  const dialog = $("ask-dir");
  dialog.addEventListener("close", () => {
    if (dialog.returnValue === "go" && $("restore-dir").value) {
      act("/v1/restores", { domain, point: point || "latest", to_dir: $("restore-dir").value },
        `Restore ${domain}`, "Start the restore");
    }
  }, { once: true });
  dialog.showModal();
}

async function follow() {
  const j = await api("GET", `/v1/jobs/${state.following}`);
  const banner = $("following");
  banner.hidden = false;
  banner.dataset.state = j.state;
  const pct = Math.round((j.state === "succeeded" ? 1 : j.progress || 0) * 100);
  const what = j.kind === "runbook" ? `runbook ${j.params.runbook}` : j.kind;
  banner.textContent = `${what} of ${j.domain || j.host}, job ${j.id}: ${j.state} (${pct}%)` +
    (j.error ? `: ${j.error}` : j.progress_text ? `: ${j.progress_text}` : "");
  banner.className = `banner ${j.state}`;
  if (j.state === "succeeded" || j.state === "failed") state.following = null;
}

// --- signing in --------------------------------------------------------------------------
async function signIn(token) {
  state.token = token;
  try {
    await api("GET", "/v1/overview");
  } catch (e) {
    state.token = null;
    $("login-error").textContent = e instanceof ApiError && e.status === 401 ? "That token was refused."
      : e instanceof ApiError && e.status === 403 ? `This token may not read the fleet: ${e.message}` : String(e);
    return;
  }
  sessionStorage.setItem("virtwarden-token", token);
  $("login").hidden = true;
  $("tabs").hidden = false;
  $("logout").hidden = false;
  $("login-error").textContent = "";
  show("fleet");
  if (state.timer === null) state.timer = setInterval(refresh, 1500);
}

function signOut() {
  sessionStorage.removeItem("virtwarden-token");
  state.token = null;
  clearInterval(state.timer);
  state.timer = null;
  for (const name of Object.keys(pages)) $(name).hidden = true;
  delete $("runbook-list").dataset.loaded;
  $("tabs").hidden = true;
  $("logout").hidden = true;
  $("following").hidden = true;
  $("login").hidden = false;
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => { ev.preventDefault(); signIn($("token").value.trim()); });
  $("logout").addEventListener("click", signOut);
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => show(b.dataset.tab));
  if (state.token) signIn(state.token);
});
