// Hone UI: one page, hash routes, plain DOM and inline SVG charts. No framework, nothing fetched from the internet.
"use strict";

const $ = (sel, el = document) => el.querySelector(sel);
const main = () => $("#main");
const POLL_MS = 1000;
let apiKey = sessionStorage.getItem("honeKey") || "";
let timer = null;     // the current page's poll timer
let pageToken = 0;    // bumps on every navigation, so a late response never paints an old page

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
}
function fmt(x, digits = 3) {
  if (x === null || x === undefined || x === "") return "-";
  if (typeof x !== "number") return esc(x);
  if (Number.isInteger(x)) return x.toLocaleString("en");
  if (Math.abs(x) >= 1000) return x.toFixed(0);
  const text = x.toPrecision(digits);
  return text.includes("e") || !text.includes(".") ? text : text.replace(/\.?0+$/, "");
}
function when(seconds) {
  if (!seconds) return "-";
  const d = new Date(seconds * 1000);
  return d.toLocaleString("en-GB", {hour12: false});
}
function badge(state) { return `<span class="badge ${esc(state)}" data-state="${esc(state)}">${esc(state)}</span>`; }
function enc(path) { return path.split("/").map(encodeURIComponent).join("/"); }

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options = {}) {
  const headers = {};
  if (apiKey) headers["Authorization"] = "Bearer " + apiKey;
  const init = {method: options.method || "GET", headers};
  if (options.body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.body);
    init.method = options.method || "POST";
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    $("#keybox").hidden = false;
    throw new Error("this UI needs its API key: enter it above");
  }
  const type = response.headers.get("content-type") || "";
  const data = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) throw new Error((data && data.error && data.error.message) || String(data) || response.statusText);
  return data;
}

// ------------------------------------------------------------------------------------------------ routing

const routes = [
  [/^\/$/, pageRuns, "runs"],
  [/^\/new$/, pageNew, "new"],
  [/^\/tasks$/, pageTasks, "tasks"],
  [/^\/artifacts$/, pageArtifacts, "artifacts"],
  [/^\/chat$/, pageChat, "chat"],
  [/^\/servers$/, pageServers, "servers"],
  [/^\/job\/([\w-]+)$/, pageJob, "runs"],
  [/^\/run\/(.+)$/, pageRun, "runs"],
  [/^\/report\/(run|task)\/(.+)$/, pageReport, "runs"],
];

function route() {
  clearTimeout(timer);
  pageToken += 1;
  showError("");
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  for (const [pattern, page, nav] of routes) {
    const match = path.match(pattern);
    if (match) {
      document.querySelectorAll("nav a").forEach(a => a.classList.toggle("active", a.dataset.page === nav));
      const token = pageToken;
      Promise.resolve(page(token, params, ...match.slice(1).map(decodeURIComponent)))
        .catch(err => { if (token === pageToken) showError(err.message); });
      return;
    }
  }
  main().innerHTML = `<h1>Not found</h1><p><a href="#/">Back to the runs</a></p>`;
}

function repeat(token, fn, ms = POLL_MS) {
  const tick = async () => {
    if (token !== pageToken) return;
    let again = true;
    try { again = await fn(); showError(""); } catch (err) { showError(err.message); }
    if (again !== false && token === pageToken) timer = setTimeout(tick, ms);
  };
  return tick();
}

// ------------------------------------------------------------------------------------------------ runs

async function pageRuns(token) {
  main().innerHTML = `<h1>Runs</h1><div class="actions"><a class="button" href="#/new" id="new-run">New run</a></div>
    <div id="jobs"></div><div id="runs">loading…</div>`;
  await repeat(token, async () => {
    const data = await api("/api/runs");
    if (token !== pageToken) return false;
    const active = data.jobs.filter(j => j.kind === "run" && j.state === "running");
    $("#jobs").innerHTML = active.length ? `<h2>Running now</h2><table><tr><th>command</th><th>state</th><th>started</th></tr>
      ${active.map(j => `<tr><td><a href="#/job/${esc(j.id)}">${esc(j.command)}</a></td><td>${badge(j.state)}</td>
      <td>${when(j.started)}</td></tr>`).join("")}</table>` : "";
    $("#runs").innerHTML = data.runs.length ? `<h2>Run folders</h2><table id="runs-table"><tr><th>run</th><th>task</th>
      <th>method</th><th>status</th><th class="num">score</th><th>last change</th><th>artifact</th></tr>
      ${data.runs.map(r => `<tr><td><a href="#/run/${enc(r.id)}">${esc(r.id)}</a></td><td>${esc(r.task)}</td>
      <td>${esc(r.method)}</td><td>${badge(r.job && r.job.state === "running" ? "running" : r.status)} ${progressText(r.progress)}</td>
      <td class="num">${r.score === null ? "-" : fmt(r.score) + ` <span class="meta">${esc(r.metric || "")}</span>`}</td>
      <td>${when(r.modified)}</td><td>${r.artifact ? `<a href="#/chat?a=${encodeURIComponent(r.artifact)}">chat</a>` : "-"}</td></tr>`).join("")}
      </table>` : `<div class="card">No runs yet in ${esc(data.root || "the runs folder")}. <a href="#/new">Start one</a>.</div>`;
    return true;
  }, 2000);
}

function progressText(p) {
  if (!p || !p.total) return "";
  return `<span class="meta">${fmt(p.done)}/${fmt(p.total)}</span>`;
}

// ------------------------------------------------------------------------------------------------ new run

async function pageNew(token, params) {
  const [tasks, methods] = await Promise.all([api("/api/tasks"), api("/api/methods")]);
  if (token !== pageToken) return;
  const chosen = params.get("task") || "";
  main().innerHTML = `<h1>Start a run</h1>
  <div class="card"><form class="grid" id="start-form">
    <label for="verb">command</label>
    <select id="verb"><option value="tune">hone tune (parameter-efficient tuning)</option>
      <option value="align">hone align (reward-based: DPO, GRPO, ...)</option>
      <option value="prompt">hone prompt (prompt program, optional search)</option>
      <option value="compare">hone compare (several methods, one leaderboard)</option></select>
    <label for="task">task</label>
    <select id="task">${tasks.tasks.map(t => `<option value="${esc(t.source)}" ${t.source === chosen ? "selected" : ""}>
      ${esc(t.name)} (${esc(t.kind)}${t.metric ? ", " + esc(t.metric) : ""})</option>`).join("")}
      <option value="">another YAML path…</option></select>
    <label for="task-path" class="when-path">task YAML path</label>
    <input id="task-path" class="when-path" placeholder="examples/sst2.yaml (relative to where hone ui runs)">
    <label for="method" class="when-method">method</label>
    <select id="method" class="when-method"></select>
    <label for="methods" class="when-compare">methods</label>
    <input id="methods" class="when-compare" placeholder="zero-shot,few-shot,lora (empty: Hone's default list)">
    <label for="limit" class="when-compare">judge on first N examples</label>
    <input id="limit" class="when-compare" type="number" min="1" placeholder="all">
    <label for="search" class="when-prompt">search candidates</label>
    <input id="search" class="when-prompt" type="number" min="1" placeholder="no search (the task's prompt)">
    <label for="budget">budget (seconds)</label>
    <input id="budget" type="number" min="1" placeholder="none (per method for compare)">
    <label for="overrides">settings (key=value)</label>
    <textarea id="overrides" placeholder="max_steps=20 lr=1e-4 r=8"></textarea>
    <span></span><div><button type="submit" id="start">Start</button> <span class="meta" id="start-note"></span></div>
  </form></div>`;
  const verb = $("#verb"), method = $("#method");
  const sync = () => {
    const v = verb.value;
    document.querySelectorAll(".when-method").forEach(e => e.hidden = !(v === "tune" || v === "align"));
    document.querySelectorAll(".when-compare").forEach(e => e.hidden = v !== "compare");
    document.querySelectorAll(".when-prompt").forEach(e => e.hidden = v !== "prompt");
    document.querySelectorAll(".when-path").forEach(e => e.hidden = $("#task").value !== "");
    const names = methods[v] || [];
    if (method.dataset.verb !== v) {
      method.innerHTML = names.map(n => `<option ${n === (v === "tune" ? "lora" : "dpo") ? "selected" : ""}>${esc(n)}</option>`).join("");
      method.dataset.verb = v;
    }
  };
  verb.addEventListener("change", sync);
  $("#task").addEventListener("change", sync);
  sync();
  $("#start-form").addEventListener("submit", async event => {
    event.preventDefault();
    const v = verb.value, number = id => ($(id).value ? Number($(id).value) : null);
    const body = {verb: v, task: $("#task").value || $("#task-path").value.trim(),
      overrides: $("#overrides").value.split(/\s+/).filter(Boolean), budget_seconds: number("#budget")};
    if (v === "tune" || v === "align") body.method = method.value;
    if (v === "compare") { body.methods = $("#methods").value.trim() || null; body.limit = number("#limit"); }
    if (v === "prompt") body.search = number("#search");
    $("#start").disabled = true;
    $("#start-note").textContent = "starting…";
    try {
      const job = await api("/api/jobs", {body});
      location.hash = `#/job/${job.id}`;
    } catch (err) {
      showError(err.message);
      $("#start").disabled = false;
      $("#start-note").textContent = "";
    }
  });
}

// ------------------------------------------------------------------------------------------------ a run, live

function runView() {
  return {rows: [], since: 0, run: null};
}

async function pageJob(token, params, id) {
  main().innerHTML = `<div id="run-page">loading…</div>`;
  const view = runView();
  await repeat(token, async () => {
    const data = await api(`/api/jobs/${id}?since=${view.since}`);
    if (token !== pageToken) return false;
    if (data.detail) {
      if (view.run !== data.detail.id) { view.rows = []; view.run = data.detail.id; }
      view.rows.push(...data.detail.metrics);
      view.since = data.detail.metrics_next;
    }
    renderRun(view, data.detail, data, data.output);
    return data.state === "running" || (data.detail && data.detail.kind === "compare" && !data.detail.leaderboard);
  });
}

async function pageRun(token, params, id) {
  main().innerHTML = `<div id="run-page">loading…</div>`;
  const view = runView();
  await repeat(token, async () => {
    const detail = await api(`/api/runs/${enc(id)}?since=${view.since}`);
    if (token !== pageToken) return false;
    view.rows.push(...detail.metrics);
    view.since = detail.metrics_next;
    renderRun(view, detail, detail.job, detail.output || detail.log);
    return Boolean(detail.job && detail.job.state === "running");
  }, 1500);
}

function renderRun(view, detail, job, output) {
  const state = job ? job.state : (detail ? detail.status : "starting");
  const title = detail ? `${esc(detail.method)} on ${esc(detail.task)}` : esc(job.command);
  const p = detail && detail.progress;
  const pct = p && p.total ? Math.min(100, Math.round(100 * p.done / p.total)) : (state === "finished" ? 100 : 0);
  const artifact = detail && detail.artifact;
  const parts = [`<h1>${title} ${badge(state)}</h1>`];
  if (job) parts.push(`<p class="meta"><code id="command">${esc(job.command)}</code> · started ${when(job.started)}
    ${job.ended ? "· ended " + when(job.ended) + " (exit " + job.returncode + ")" : ""}</p>`);
  if (detail) parts.push(`<p class="meta">run folder <a href="#/run/${enc(detail.id)}">${esc(detail.id)}</a></p>`);
  parts.push(`<div class="progress" title="${pct}%"><div style="width:${pct}%"></div></div>
    <p class="meta" id="progress-text">${p && p.total ? `${detail.kind === "compare" ? "methods" : "steps"} ${fmt(p.done)} of ${fmt(p.total)}` : ""}</p>`);
  const actions = [];
  if (job && job.state === "running") actions.push(`<button class="danger" id="cancel">Cancel</button>`);
  if (job && job.resumable && state !== "finished") actions.push(`<button class="secondary" id="resume">Resume</button>`);
  if (detail && detail.kind === "compare") actions.push(`<a class="button secondary" id="open-report" href="#/report/run/${enc(detail.id)}">Report</a>`);
  else if (detail && detail.task && artifact) actions.push(`<a class="button secondary" id="open-report" href="#/report/task/${encodeURIComponent(detail.task)}">Task leaderboard report</a>`);
  if (artifact) {
    actions.push(`<a class="button secondary" id="chat-artifact" href="#/chat?a=${encodeURIComponent(artifact)}">Chat with the artifact</a>`);
    actions.push(`<button class="secondary" id="serve-artifact" data-artifact="${esc(artifact)}">Serve the ${detail.kind === "compare" ? "winner" : "artifact"}</button>`);
  }
  parts.push(`<div class="actions">${actions.join("")}</div><div id="action-note" class="meta"></div>`);
  if (detail && detail.leaderboard) parts.push(leaderboardHtml(detail.leaderboard));
  if (detail && detail.children && detail.children.length) {
    parts.push(`<h2>Methods</h2><table><tr><th>method run</th><th>status</th><th class="num">score</th></tr>
      ${detail.children.map(c => `<tr><td><a href="#/run/${enc(c.id)}">${esc(c.name)}</a></td>
      <td>${badge(c.status)} ${progressText(c.progress)}</td><td class="num">${fmt(c.score)}</td></tr>`).join("")}</table>`);
  }
  parts.push(chartsHtml(view.rows));
  parts.push(trialsHtml(view.rows));
  parts.push(eventsHtml(view.rows));
  if (detail && detail.artifact_info) parts.push(artifactHtml(detail.artifact_info));
  if (output) parts.push(`<h2>Output</h2><pre class="log" id="output">${esc(output.trim().split("\n").slice(-60).join("\n"))}</pre>`);
  if (detail && detail.config) parts.push(`<details><summary>config.yaml</summary><pre class="log">${esc(detail.config)}</pre></details>`);
  $("#run-page").innerHTML = parts.join("\n");
  const cancel = $("#cancel"), resume = $("#resume"), serve = $("#serve-artifact");
  if (cancel) cancel.onclick = async () => { cancel.disabled = true; await act(() => api(`/api/jobs/${job.id}/cancel`, {body: {}})); };
  if (resume) resume.onclick = async () => {
    resume.disabled = true;
    const next = await act(() => api(`/api/jobs/${job.id}/resume`, {body: {}}));
    if (next) location.hash = `#/job/${next.id}`;
  };
  if (serve) serve.onclick = () => startServer(serve.dataset.artifact, serve);
}

async function act(fn) {
  try { return await fn(); } catch (err) { showError(err.message); return null; }
}

async function startServer(artifact, button) {
  if (button) button.disabled = true;
  const job = await act(() => api("/api/serve", {body: {artifact}}));
  if (job) location.hash = "#/servers";
  else if (button) button.disabled = false;
}

function leaderboardHtml(board) {
  const rec = board.recommendation;
  const rows = board.rows.map(r => r.status === "done" ? `<tr><td>${esc(r.method)}</td><td>${esc(r.family)}</td>
    <td class="num">${fmt(r.score)}</td><td class="num">${r.ci_low === null ? "-" : `[${fmt(r.ci_low)}, ${fmt(r.ci_high)}]`}</td>
    <td class="num">${fmt(r.n)}</td><td class="num">${r.train_seconds ? fmt(r.train_seconds, 2) + " s" : "-"}</td>
    <td class="num">${fmt(r.trainable_params)}</td><td class="num">${r.latency_ms === null ? "-" : fmt(r.latency_ms, 2) + " ms"}</td>
    <td>${badge("done")}</td></tr>` : `<tr><td>${esc(r.method)}</td><td>${esc(r.family)}</td><td colspan="6" class="meta">${esc(r.reason || "")}</td>
    <td>${badge(r.status)}</td></tr>`).join("");
  return `<h2>Leaderboard <span class="meta">${esc(board.metric)} on ${esc(board.split)}</span></h2>
    ${rec ? `<div class="rec" id="recommendation"><b>Recommended: ${esc(rec.method)}</b> (${esc(rec.family)})
      <ul>${(rec.reasons || []).map(x => `<li>${esc(x)}</li>`).join("")}</ul></div>` : ""}
    <table id="leaderboard"><tr><th>method</th><th>family</th><th class="num">score</th><th class="num">95% CI</th><th class="num">n</th>
    <th class="num">train time</th><th class="num">trainable</th><th class="num">latency/req</th><th>status</th></tr>${rows}</table>`;
}

function artifactHtml(a) {
  const cost = a.cost || {};
  return `<h2>Artifact</h2><div class="card kv" id="artifact-info">
    <div>name</div><div>${esc(a.name)}</div><div>method · kind</div><div>${esc(a.method)} · ${esc(a.kind)}</div>
    <div>base model</div><div>${esc(a.base_model)}</div><div>validation</div><div>${a.score === null ? "-" : esc(a.metric) + " " + fmt(a.score)}</div>
    <div>trainable parameters</div><div>${fmt(cost.trainable_params)}</div><div>train time</div><div>${cost.train_seconds ? fmt(cost.train_seconds, 2) + " s" : "-"}</div>
    <div>path</div><div><code>${esc(a.path)}</code></div></div>`;
}

const GUARD_KEYS = ["proxy", "gold", "kl", "mean_length", "distinct_n", "entropy"];

function chartsHtml(rows) {
  // training lines: no event; online RL and RFT mark theirs kind "train" (guard checks and alarms have their own kinds)
  const train = rows.filter(r => typeof r.step === "number" && !r.event && (!r.kind || r.kind === "train"));
  const evals = rows.filter(r => r.event === "eval" && typeof r.step === "number");
  const guard = rows.filter(r => r.kind === "guard" && typeof r.step === "number");
  const alarms = rows.filter(r => r.kind === "alarm");
  const series = (list, key) => list.filter(r => typeof r[key] === "number").map(r => [r.step, r[key]]);
  const charts = [];
  const loss = {};
  if (series(train, "loss").length) loss.loss = series(train, "loss");
  if (series(evals, "val_loss").length) loss.val_loss = series(evals, "val_loss");
  if (Object.keys(loss).length) charts.push(chart("loss", loss));
  const valKeys = [...new Set(evals.flatMap(r => Object.keys(r)))].filter(k => k.startsWith("val_") && k !== "val_loss");
  for (const key of valKeys) charts.push(chart(key, {[key]: series(evals, key)}));
  const rewardKeys = [...new Set(train.flatMap(r => Object.keys(r)))].filter(k => /reward|kl|margin|accuracy/.test(k) && k !== "loss");
  for (const key of rewardKeys.slice(0, 6)) charts.push(chart(key, {[key]: series(train, key)}));
  for (const key of GUARD_KEYS) {
    const s = series(guard, key);
    if (s.length) charts.push(chart(`guard: ${key}`, {[key]: s}, alarms.map(a => a.step)));
  }
  if (!charts.length) return "";
  const alarmList = alarms.length ? `<div>${alarms.map(a => `<p class="alarm">step ${esc(a.step)}: ${esc(a.alarm)} — ${esc(a.message)}</p>`).join("")}</div>` : "";
  return `<h2>Curves</h2><div class="charts" id="charts">${charts.join("")}</div>${alarmList}`;
}

const COLORS = ["#2f6fde", "#e8590c", "#1f9254", "#c4320a", "#7a5af8", "#667085"];

function chart(title, bySeries, marks = []) {
  const W = 420, H = 200, L = 52, R = 10, T = 10, B = 28;
  const points = Object.values(bySeries).flat();
  if (!points.length) return "";
  let [x0, x1] = [Math.min(...points.map(p => p[0])), Math.max(...points.map(p => p[0]))];
  let [y0, y1] = [Math.min(...points.map(p => p[1])), Math.max(...points.map(p => p[1]))];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { const d = Math.abs(y0) * 0.05 || 0.5; y0 -= d; y1 += d; }
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R), sy = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const lines = Object.entries(bySeries).map(([name, pts], i) => {
    const color = COLORS[i % COLORS.length];
    const path = pts.map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    const dots = pts.length <= 40 ? pts.map(p => `<circle cx="${sx(p[0]).toFixed(1)}" cy="${sy(p[1]).toFixed(1)}" r="2.2" fill="${color}"/>`).join("") : "";
    return `<polyline fill="none" stroke="${color}" stroke-width="1.8" points="${path}"/>${dots}`;
  }).join("");
  const legend = Object.keys(bySeries).length > 1 ? Object.keys(bySeries).map((name, i) =>
    `<span style="color:${COLORS[i % COLORS.length]}">■ ${esc(name)}</span>`).join(" ") : "";
  const markLines = marks.filter(m => typeof m === "number").map(m => `<line x1="${sx(m)}" x2="${sx(m)}" y1="${T}" y2="${H - B}" stroke="#c4320a" stroke-dasharray="3 3"/>`).join("");
  return `<div class="chart" data-chart="${esc(title)}"><p class="title">${esc(title)} <span class="meta">${legend}</span></p>
    <svg viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(title)}">
    <line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#98a2b3"/><line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="#98a2b3"/>
    <text x="${L - 4}" y="${T + 8}" text-anchor="end" font-size="10" fill="#667085">${fmt(y1)}</text>
    <text x="${L - 4}" y="${H - B}" text-anchor="end" font-size="10" fill="#667085">${fmt(y0)}</text>
    <text x="${L}" y="${H - 10}" font-size="10" fill="#667085">step ${fmt(x0)}</text>
    <text x="${W - R}" y="${H - 10}" text-anchor="end" font-size="10" fill="#667085">${fmt(x1)}</text>
    ${markLines}${lines}</svg></div>`;
}

function trialsHtml(rows) {
  const generic = rows.filter(r => r.trial !== undefined);  // a hyperparameter search: {trial, params, value}
  const genericTable = generic.length ? `<h2>Search trials <span class="meta">${generic.length} trials</span></h2>
    <table id="trials"><tr><th class="num">trial</th><th>settings</th><th class="num">value</th><th>state</th></tr>
    ${generic.map(t => `<tr><td class="num">${esc(t.trial)}</td><td><code>${esc(JSON.stringify(t.params || {}))}</code></td>
    <td class="num">${fmt(t.value ?? t.score)}</td><td>${esc(t.state || "")}</td></tr>`).join("")}</table>` : "";
  const trials = rows.filter(r => r.instruction_id !== undefined);  // hone prompt --search: one row per candidate
  if (!trials.length) return genericTable;
  const best = Math.max(...trials.map(t => (typeof t.score === "number" ? t.score : -Infinity)));
  return `<h2>Search trials <span class="meta">${trials.length} candidates</span></h2><table id="trials"><tr><th class="num">#</th>
    <th>instruction</th><th class="num">shots</th><th>selector</th><th>calibration</th><th class="num">score</th><th class="num">95% CI</th></tr>
    ${trials.map(t => `<tr${t.score === best ? ' style="font-weight:600"' : ""}><td class="num">${esc(t.id)}</td>
    <td>${esc((t.instruction || t.instruction_id || "").slice(0, 140))}</td><td class="num">${esc(t.shots)}</td>
    <td>${esc(t.selector || "-")}</td><td>${esc(t.calibration || "-")}</td><td class="num">${fmt(t.score)}</td>
    <td class="num">[${fmt(t.ci_low)}, ${fmt(t.ci_high)}]</td></tr>`).join("")}</table>`;
}

function eventsHtml(rows) {
  const events = rows.filter(r => r.event && r.event !== "eval");
  if (!events.length) return "";
  const skip = new Set(["time", "event", "step"]);
  return `<h2>Events</h2><table id="events"><tr><th>time</th><th>step</th><th>event</th><th>details</th></tr>
    ${events.map(e => `<tr><td>${when(e.time)}</td><td>${esc(e.step ?? "")}</td><td>${esc(e.event)}</td>
    <td class="meta">${Object.entries(e).filter(([k]) => !skip.has(k)).slice(0, 12).map(([k, v]) => `${esc(k)}=${typeof v === "number" ? fmt(v) : esc(JSON.stringify(v))}`).join(" · ")}</td></tr>`).join("")}</table>`;
}

// ------------------------------------------------------------------------------------------------ report

async function pageReport(token, params, what, name) {
  const url = what === "run" ? `/api/runs/${enc(name)}/report` : `/api/tasks/${encodeURIComponent(name)}/report`;
  const back = what === "run" ? `<a href="#/run/${enc(name)}">back to the run</a>` : `<a href="#/tasks">back to the tasks</a>`;
  main().innerHTML = `<h1>Report: ${esc(name)}</h1><p class="meta">${back} · ${what === "run" ? "hone report of this compare run"
    : "every finished run of this task, ranked by its validation score"}</p><p id="report-note">writing the report…</p>`;
  const html = await api(url);
  if (token !== pageToken) return;
  $("#report-note").remove();
  const frame = document.createElement("iframe");
  frame.className = "report";
  frame.id = "report";
  // The report is static HTML: no scripts may run in it and it cannot navigate; same-origin only so that the
  // frame can be sized to the report (the whole page scrolls, not a box inside it).
  frame.setAttribute("sandbox", "allow-same-origin");
  frame.addEventListener("load", () => {
    const doc = frame.contentDocument;
    if (doc) frame.style.height = (doc.documentElement.scrollHeight + 24) + "px";
  });
  frame.srcdoc = html;
  main().appendChild(frame);
}

// ------------------------------------------------------------------------------------------------ tasks, artifacts

async function pageTasks(token) {
  const data = await api("/api/tasks");
  if (token !== pageToken) return;
  main().innerHTML = `<h1>Tasks</h1><table id="tasks"><tr><th>task</th><th>from</th><th>metric</th><th>model</th><th>source</th><th></th></tr>
    ${data.tasks.map(t => `<tr><td><b>${esc(t.name)}</b><div class="meta">${esc(t.description)}</div></td><td>${esc(t.kind)}</td>
    <td>${esc(t.metric)}</td><td>${esc(t.model || "default")}</td><td><code>${esc(t.source)}</code></td>
    <td><a href="#/new?task=${encodeURIComponent(t.source)}">start a run</a> · <a href="#/report/task/${encodeURIComponent(t.name)}">report</a></td></tr>`).join("")}</table>`;
}

async function pageArtifacts(token) {
  const data = await api("/api/artifacts");
  if (token !== pageToken) return;
  main().innerHTML = `<h1>Artifacts</h1>${data.artifacts.length ? `<table id="artifacts"><tr><th>artifact</th><th>method</th><th>kind</th><th>task</th>
    <th class="num">validation</th><th>created</th><th></th></tr>
    ${data.artifacts.map(a => `<tr><td><b>${esc(a.name)}</b><div class="meta">${esc(a.id)}</div></td><td>${esc(a.method)}</td>
    <td>${esc(a.kind)}</td><td>${esc(a.task)}</td><td class="num">${a.score === null ? "-" : fmt(a.score) + ` <span class="meta">${esc(a.metric)}</span>`}</td>
    <td>${esc(a.created_at)}</td><td>${a.run ? `<a href="#/run/${enc(a.run)}">run</a> · ` : ""}<a href="#/chat?a=${encodeURIComponent(a.id)}">chat</a>
    · <a href="#" data-serve="${esc(a.id)}">serve</a></td></tr>`).join("")}</table>` : `<div class="card">No artifacts yet.</div>`}`;
  document.querySelectorAll("[data-serve]").forEach(link => link.addEventListener("click", event => {
    event.preventDefault();
    startServer(link.dataset.serve);
  }));
}

// ------------------------------------------------------------------------------------------------ chat

async function pageChat(token, params) {
  const data = await api("/api/artifacts");
  if (token !== pageToken) return;
  const options = selected => data.artifacts.map(a => `<option value="${esc(a.id)}" ${a.id === selected ? "selected" : ""}>
    ${esc(a.name)} — ${esc(a.id)}</option>`).join("");
  const a = params.get("a") || (data.artifacts[0] && data.artifacts[0].id) || "";
  const b = params.get("b") || (data.artifacts.find(x => x.id !== a) || {}).id || a;
  main().innerHTML = `<h1>Chat side by side</h1>
    <p class="meta">The same prompt goes to both artifacts, each with its own prompt program (system prompt, demonstrations)
    and chat template, as <code>hone serve</code> applies them. Greedy decoding unless you raise the temperature.</p>
    ${data.artifacts.length ? "" : `<div class="card">No artifacts yet: finish a run first.</div>`}
    <div class="sides"><div><label class="meta" for="left">left</label><select id="left">${options(a)}</select></div>
    <div><label class="meta" for="right">right</label><select id="right"><option value="">(none)</option>${options(b)}</select></div></div>
    <div class="card" style="margin-top:1rem"><textarea id="prompt" placeholder="Type a message"></textarea>
    <div class="actions"><button id="send">Send</button>
    <label class="meta">max tokens <input id="max-tokens" type="number" value="64" min="1" max="512" style="width:6rem"></label>
    <label class="meta">temperature <input id="temperature" type="number" value="0" min="0" max="2" step="0.1" style="width:5rem"></label>
    <span class="meta" id="chat-note"></span></div></div>
    <div class="sides"><div id="side-0"></div><div id="side-1"></div></div>`;
  $("#send").addEventListener("click", async () => {
    const text = $("#prompt").value.trim();
    if (!text) return;
    const artifacts = [$("#left").value, $("#right").value].filter(Boolean);
    $("#send").disabled = true;
    $("#chat-note").textContent = "generating… (the first message loads the models)";
    try {
      const out = await api("/api/chat", {body: {artifacts, messages: [{role: "user", content: text}],
        max_tokens: Number($("#max-tokens").value) || 64, temperature: Number($("#temperature").value) || 0}});
      out.answers.forEach((answer, i) => {
        const side = $(`#side-${i}`);
        side.insertAdjacentHTML("afterbegin", `<div class="bubble user"><span class="who">you</span>${esc(text)}</div>
          <div class="bubble assistant answer" data-side="${i}"><span class="who">${esc(answer.name)} · ${answer.completion_tokens} tokens · ${fmt(answer.seconds, 2)} s · ${esc(answer.finish_reason)}</span>${answerText(answer.text)}</div>`);
      });
      $("#chat-note").textContent = `answered in ${fmt(out.seconds, 2)} s`;
    } catch (err) {
      showError(err.message);
      $("#chat-note").textContent = "";
    } finally {
      $("#send").disabled = false;
    }
  });
}

function answerText(text) {
  // A reply of only spaces and newlines would show as an empty box: say what it is instead.
  if (!text.trim()) return `<span class="meta">(blank: ${text.length} whitespace characters)</span>`;
  return `<span class="text">${esc(text)}</span>`;
}

// ------------------------------------------------------------------------------------------------ servers

async function pageServers(token) {
  const artifacts = await api("/api/artifacts");
  if (token !== pageToken) return;
  main().innerHTML = `<h1>Servers</h1><p class="meta">Each is <code>hone serve ARTIFACT</code> on a free loopback port: an
    OpenAI-compatible API (<code>/v1/chat/completions</code>). Stopping the UI stops them.</p>
    <div class="card actions"><select id="serve-pick" style="max-width:40rem">${artifacts.artifacts.map(a => `<option value="${esc(a.id)}">${esc(a.name)} — ${esc(a.id)}</option>`).join("")}</select>
    <button id="serve-start">Serve</button></div><div id="servers"></div>`;
  $("#serve-start").onclick = () => startServer($("#serve-pick").value, $("#serve-start")).then(() => { $("#serve-start").disabled = false; });
  await repeat(token, async () => {
    const data = await api("/api/jobs");
    if (token !== pageToken) return false;
    const servers = data.jobs.filter(j => j.kind === "server");
    $("#servers").innerHTML = servers.length ? `<table id="servers-table"><tr><th>server</th><th>state</th><th>base URL</th><th></th></tr>
      ${servers.map(s => `<tr><td><code>${esc(s.command)}</code></td><td>${badge(s.state === "running" ? (s.ready ? "ready" : "loading") : s.state)}</td>
      <td>${s.state === "running" ? `<code>${esc(s.url)}</code>` : "-"}</td>
      <td>${s.state === "running" ? `<button class="danger" data-stop="${esc(s.id)}">Stop</button>` : ""}</td></tr>`).join("")}</table>` : "<p>No servers started.</p>";
    document.querySelectorAll("[data-stop]").forEach(b => b.onclick = () => act(() => api(`/api/jobs/${b.dataset.stop}/cancel`, {body: {}})));
    return true;
  }, 1500);
}

// ------------------------------------------------------------------------------------------------ start

$("#keyform").addEventListener("submit", event => {
  event.preventDefault();
  apiKey = $("#keyinput").value.trim();
  sessionStorage.setItem("honeKey", apiKey);
  $("#keybox").hidden = true;
  route();
});
window.addEventListener("hashchange", route);
api("/api/info").then(info => { $("#where").textContent = `runs: ${info.runs}`; }).catch(() => {});
route();
