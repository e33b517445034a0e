// Raw FedAvg: the live page, in four plain scripts with no framework, loaded
// in order: numbers.js (numbers written as the server's log writes them, and
// small DOM helpers), round.js (the selected round's arithmetic), form.js
// (starting a run, comparing runs) and app.js (the state, the views, the loop).
"use strict";

const POLL_MS = 250;         // a round shows, with its charts, within about a second of completing
const HEALTH_EVERY = 4;      // ticks between /health checks (a run started elsewhere)
const IDLE_REFRESH_MS = 5000; // between runs: the clients' health and the list of runs

// --- state: everything the page shows comes from here -------------------------------
//
// Loaders and the poll only change `state`; `render()` then draws every view
// (run menu, status, progress, table of rounds, the round's math, the charts,
// the federation) from one snapshot of it, in one synchronous pass. The
// charts are fetched for that snapshot first, so no view ever shows another
// round than the others.

const state = {
  clients: null,     // GET /clients: each configured client, up or down
  runs: [],          // GET /runs: every run, without rounds
  run: null,         // the selected run without its rounds
  rounds: [],        // its rounds, in order (replaced, never changed in place)
  selected: null,    // the round number shown in the arithmetic and the charts
  follow: true,      // select each new round as it arrives
  clientFilter: "",  // what the federation's filter box holds
  actionError: "",   // the answer to Stop / Resume, when it was an error
  knownRunning: null,
  lastIdleRefresh: 0,
  selectSeq: 0,      // bumped by every selectRun: a slower, older answer must not win
};

const lastRound = (rounds) => (rounds.length ? rounds[rounds.length - 1].round : null);

function snapshot() {
  return { ...state, rounds: state.rounds.slice() };
}

// What is on the screen now, to redraw only what changed.
const view = { busy: false, again: false, charts: null, mathKey: null, table: { runId: null, rows: new Map() } };

// Draw the page from the current state. One render at a time; a change while
// the charts load draws again afterwards, from the newer state.
async function render() {
  if (view.busy) { view.again = true; return; }
  view.busy = true;
  try {
    do {
      view.again = false;
      const snap = snapshot();
      const charts = await chartsFor(snap);
      paint(snap, charts);
    } while (view.again);
  } finally {
    view.busy = false;
  }
}

// Everything, synchronously: no poll or click can land between two views.
function paint(snap, charts) {
  paintClients(snap);
  paintRunMenu(snap);
  paintRun(snap);
  paintRoundsTable(snap);
  paintRoundNav(snap);
  paintMath(snap);
  paintCharts(snap, charts);
  updateCompareList(runsAsShown(snap));
}

// The runs as the page shows them: the selected one with what the poll
// knows of it (status, rounds so far), the others as GET /runs said.
function runsAsShown(snap) {
  const runs = snap.runs.map((r) => ({ ...r }));
  if (snap.run) {
    const mine = { ...snap.run, rounds_completed: snap.rounds.length };
    const i = runs.findIndex((r) => r.run_id === mine.run_id);
    if (i >= 0) runs[i] = mine;
    else runs.unshift(mine);
  }
  return runs;
}

// --- the federation ------------------------------------------------------------

async function loadClients() {
  const { ok, body } = await getJSON("/clients");
  if (!ok) return;
  state.clients = body.clients;
  render();
}

const clientText = (c) => `${c.client_id} ${c.url} ${c.status === "up" ? "up" : `down ${c.reason}`}`.toLowerCase();

function paintClients(snap) {
  if (!snap.clients) return;
  const tbody = $("#clients tbody");
  const filter = snap.clientFilter.trim().toLowerCase();
  // A hosted population is one row of c.clients clients (up or down with its host).
  let up = 0, total = 0, shown = 0, all = 0;
  for (const c of snap.clients) {
    const count = c.clients ?? 1;
    all += count;
    if (c.status === "up") { up += count; total += c.n_k; }
    const row = tbody.querySelector(`tr[data-url="${CSS.escape(c.url)}"]`);
    if (!row) continue;
    row.dataset.status = c.status;
    $('[data-field="client_id"]', row).textContent = c.client_id;
    $('[data-field="url"]', row).hidden = c.client_id === c.url;  // a client that never said its name
    const status = $('[data-field="status"]', row);
    status.textContent = c.status === "up" ? "up" : `down: ${c.reason}`;
    status.className = c.status;
    $('[data-field="n_k"]', row).textContent = c.n_k ?? "–";
    row.hidden = filter !== "" && !clientText(c).includes(filter);
    if (!row.hidden) shown += 1;
  }
  const down = all - up;
  $("#clients-summary").textContent =
    `${up} of ${all} client(s) up; N = ${total} samples among those that are up` +
    (down ? `; ${down} down.` : ".");
  $("#clients-summary").dataset.up = up;
  $("#clients-summary").dataset.down = down;
  $("#clients-shown").textContent = filter ? `${shown} of ${snap.clients.length} shown` : "";
}

// --- runs ---------------------------------------------------------------------------

async function loadRunList() {
  const { ok, body } = await getJSON("/runs");
  if (!ok) return;
  state.runs = body.runs;
  render();
  return body.runs;
}

function paintRunMenu(snap) {
  const select = $("#run-select");
  const runs = runsAsShown(snap);
  const options = runs.map((r) => [String(r.run_id),
    `Run ${r.run_id}: ${r.status}, ${r.rounds_completed}/${r.settings.rounds} rounds`]);
  if (!options.length) options.push(["", "no runs yet"]);
  // Only the texts changed (rounds arriving): change them in place, not the
  // options under the hands of someone choosing.
  const same = options.length === select.options.length &&
    options.every(([value], i) => select.options[i].value === value);
  if (same) options.forEach(([, text], i) => { if (select.options[i].textContent !== text) select.options[i].textContent = text; });
  else select.replaceChildren(...options.map(([value, text]) => el("option", { value, text })));
  if (snap.run) select.value = String(snap.run.run_id);
}

// The whole run: GET /runs/<id> answers in pages of rounds ("more" says
// another follows), so a long run is read page by page.
async function fetchRun(runId) {
  let { ok, body } = await getJSON(`/runs/${runId}`);
  if (!ok) return null;
  let rounds = body.rounds;
  while (body.more) {
    const next = await getJSON(`/runs/${runId}?since=${lastRound(rounds)}`);
    if (!next.ok) return null;
    body = next.body;
    rounds = rounds.concat(body.rounds);
  }
  return { ...body, rounds };
}

async function selectRun(runId) {
  const seq = ++state.selectSeq;
  const body = await fetchRun(runId);
  if (!body || seq !== state.selectSeq) return;
  const { rounds, ...run } = body;
  state.run = run;
  state.rounds = rounds;
  state.selected = lastRound(rounds);
  state.actionError = "";
  await render();
}

// Poll the selected run for the rounds after the last one we have. The last
// one is asked for again: its federated loss is measured one round later.
async function pollRun() {
  const run = state.run;
  if (!run || run.status !== "running") return;
  const have = lastRound(state.rounds) ?? 0;
  const { ok, body } = await getJSON(`/runs/${run.run_id}?since=${Math.max(0, have - 1)}`);
  if (!ok || !state.run || state.run.run_id !== run.run_id) return;
  const { rounds, ...meta } = body;
  state.run = meta;
  state.rounds = mergeRounds(state.rounds, rounds);
  if (state.follow || state.selected === null) state.selected = lastRound(state.rounds);
  await render();
  if (meta.status !== "running") {
    loadRunList();
    loadClients();
  }
}

// The rounds we had, with the incoming ones added or (their loss measured since) replaced.
function mergeRounds(have, incoming) {
  const rounds = have.slice();
  for (const r of incoming) {
    const i = rounds.findIndex((x) => x.round === r.round);
    if (i >= 0) rounds[i] = r;
    else rounds.push(r);
  }
  return rounds;
}

function paintRun(snap) {
  const run = snap.run;
  if (!run) return;
  $("#downloads").hidden = false;
  $("#download-json").href = `/runs/${run.run_id}`;
  $("#download-json").setAttribute("download", `fedavg-run-${run.run_id}.json`);
  $("#download-csv").href = `/runs/${run.run_id}?format=csv`;
  $("#download-csv").setAttribute("download", `fedavg-run-${run.run_id}.csv`);
  const planned = run.settings.rounds;
  const done = snap.rounds.length;
  const s = run.settings;
  $("#run-status").textContent =
    `Run ${run.run_id} is ${run.status}: ${strategyText(s)}, lr=${fmt(s.lr)}, ${s.local_epochs} local epoch(s)` +
    `${s.batch_size ? `, batch size ${s.batch_size}` : ""}, fraction=${fmt(s.fraction)}, ` +
    `min clients ${s.min_clients}, seed ${s.seed}.`;
  $("#run-status").dataset.status = run.status;
  // Nor may it hide rounds that lost many clients to timeouts: a banner above the rest.
  $("#run-timeouts").hidden = !run.timeouts;
  $("#run-timeouts").textContent = run.timeouts ? `Timeouts: ${run.timeouts.message}.` : "";
  // "completed" can hide a client that never took part: say so.
  const warnings = run.warnings || [];
  $("#run-warnings").hidden = !warnings.length;
  $("#run-warnings").replaceChildren(...warnings.map((w) => el("li", { text: w })));
  const progress = $("#progress");
  progress.max = planned;
  progress.value = done;
  $("#progress-text").textContent = `${done} / ${planned} rounds`;
  paintPrivacy(s.dp, snap.rounds.length ? snap.rounds[snap.rounds.length - 1].privacy : null);
  $("#run-error").textContent = snap.actionError || (run.error ? `Run ${run.status}: ${run.error}` : "");
  // A running run can be stopped after its round; an interrupted or failed
  // one resumed from its last completed round.
  $("#run-stop").hidden = run.status !== "running";
  $("#run-resume").hidden = !["interrupted", "failed"].includes(run.status);
}

// A DP run's ε spent so far (after its last round) against its budget, if it has one.
function paintPrivacy(dp, last) {
  $("#privacy").hidden = !dp;
  if (!dp) return;
  const spent = last ? last.epsilon : 0;
  const budget = dp.target_epsilon;
  const meter = $("#privacy-meter");
  meter.max = budget || Math.max(spent, 1);
  meter.value = Number.isFinite(spent) ? spent : meter.max;
  meter.hidden = !budget;
  $("#privacy-text").textContent = `ε = ${Number.isFinite(spent) ? spent.toFixed(4) : "∞"}` +
    (budget ? ` of the budget ${budget}` : " (no budget set)") + ` at δ = ${dp.delta}; ` +
    `σ = ${dp.noise_multiplier}, clip S = ${last && last.clip !== null ? fmt(last.clip) : dp.clip === null ? "∞" : fmt(dp.clip)}`;
}

// "scaffold (server_lr=0.500000)", "fedprox (mu=0.010000)": the strategy and its own settings.
function strategyText(s) {
  const name = s.strategy || "fedavg";  // runs stored before strategies were FedAvg's
  const own = Object.entries(s.params || {}).map(([k, v]) => `${k}=${fmt(v)}`);
  if (name === "fedprox") own.unshift(`mu=${fmt(s.mu)}`);
  return own.length ? `${name} (${own.join(", ")})` : name;
}

// The one-line formula of a strategy, as the form's <select> has it (from fedavg.strategies).
function strategySummary(name) {
  const option = $(`#f-strategy option[value="${CSS.escape(name)}"]`);
  return option ? option.dataset.summary : "";
}

function authHeaders() {
  const headers = { "Content-Type": "application/json" };
  const token = $("#start-form").elements.namedItem("token");
  if (token && token.value) headers.Authorization = `Bearer ${token.value}`;
  return headers;
}

// POST /runs/<id>/stop or /resume for the selected run, then show it again.
async function runAction(action) {
  const run = state.run;
  if (!run) return;
  state.actionError = "";
  const body = action === "resume" ? JSON.stringify({ wait: false }) : "{}";
  try {
    const resp = await getJSON(`/runs/${run.run_id}/${action}`, { method: "POST", headers: authHeaders(), body });
    if (!resp.ok) {
      state.actionError = resp.body && resp.body.error ? resp.body.error : `HTTP ${resp.status}`;
      render();
      return;
    }
    if (action === "resume") state.knownRunning = run.run_id;
    await selectRun(run.run_id);
  } catch (e) {
    state.actionError = `The server did not answer: ${e.message}`;
    render();
  }
}

// --- the table of all rounds ----------------------------------------------------

function roundRowCells(r) {
  return [
    el("th", { scope: "row" }, el("button", { type: "button", class: "link", dataset: { round: r.round },
                                              "aria-label": `Show round ${r.round}`, text: r.round })),
    num(String(r.N)),
    // (a round of more than 100 clients lists none: its summary counts them)
    num(String(r.summary ? r.summary.contributed : r.participants.length)),
    num(String(r.summary ? r.summary.dropped : r.dropped.length)),
    num(fmtW(r.global_model.w), "w"),
    num(fmt(r.global_model.b), "b"),
    num(r.federated_loss == null ? "–" : fmt(r.federated_loss), "federated_loss"),
  ];
}

// Add the rows that are new, redraw those whose loss arrived since.
function paintRoundsTable(snap) {
  const tbody = $("#rounds tbody");
  const table = view.table;
  const runId = snap.run ? snap.run.run_id : null;
  if (table.runId !== runId || snap.rounds.length < table.rows.size) {
    tbody.replaceChildren();
    table.rows.clear();
    table.runId = runId;
  }
  const frag = document.createDocumentFragment();
  for (const r of snap.rounds) {
    const drawn = table.rows.get(r.round);
    if (drawn === undefined) frag.append(el("tr", { dataset: { round: r.round } }, ...roundRowCells(r)));
    else if (drawn !== r.federated_loss) {
      const row = $(`tr[data-round="${r.round}"]`, tbody);
      if (row) row.replaceChildren(...roundRowCells(r));
    }
    table.rows.set(r.round, r.federated_loss);
  }
  tbody.append(frag);
  for (const row of tbody.querySelectorAll("tr[aria-current]")) row.removeAttribute("aria-current");
  const row = $(`tr[data-round="${snap.selected}"]`, tbody);
  if (row) row.setAttribute("aria-current", "true");
}

// --- charts: SVG drawn by the server (matplotlib) ----------------------------------

const PLOTS = ["models", "params", "loss"];

// The three charts for a snapshot: its run, its selected round, as many
// rounds as it has. Fetched (not linked: the URL of a running run's chart
// stays the same while its picture changes) and decoded before the page
// shows them, so they appear in the same pass as the numbers. Reused while
// none of that changes.
async function chartsFor(snap) {
  if (!snap.run) return null;
  const last = snap.rounds.length ? snap.rounds[snap.rounds.length - 1] : null;
  const key = `${snap.run.run_id}|${snap.selected}|${snap.rounds.length}|${last ? last.federated_loss : ""}`;
  if (view.charts && view.charts.key === key) return view.charts;
  const q = snap.selected ? `?round=${snap.selected}` : "";
  const urls = {};
  await Promise.all(PLOTS.map(async (name) => {
    urls[name] = null;
    try {
      const resp = await fetch(`/runs/${snap.run.run_id}/plots/${name}.svg${q}`, { cache: "no-store" });
      if (!resp.ok) return;
      const url = URL.createObjectURL(await resp.blob());
      const probe = new Image();
      probe.src = url;
      await probe.decode();
      urls[name] = url;
    } catch (e) {
      // Shown as "not available" below; the next change asks again.
    }
  }));
  return { key, runId: snap.run.run_id, round: snap.selected, urls };
}

function paintCharts(snap, charts) {
  if (!charts || charts === view.charts) return;
  const old = view.charts;
  view.charts = charts;
  for (const name of PLOTS) {
    const img = $(`img[data-plot="${name}"]`);
    const url = charts.urls[name];
    if (url) img.src = url;
    else img.removeAttribute("src");
    img.dataset.round = charts.round ?? "";
    img.dataset.run = charts.runId;
    img.alt = url ? chartAlt(snap, name, charts) : `Run ${charts.runId}: this chart is not available now.`;
  }
  $("#charts-round").textContent = charts.round == null ? `run ${charts.runId}, no round yet`
                                                        : `run ${charts.runId}, round ${charts.round}`;
  if (old) for (const url of Object.values(old.urls)) if (url) URL.revokeObjectURL(url);
}

// What the chart shows, in words, for those who cannot see it.
function chartAlt(snap, name, charts) {
  const r = snap.rounds.find((x) => x.round === charts.round);
  if (name === "models") {
    return r ? `Run ${charts.runId}, round ${r.round}: the clients' local model lines and the global model ` +
               `${fmtLine(r.global_model.w, r.global_model.b)}.` : `Run ${charts.runId}: no round yet.`;
  }
  if (name === "params") return `Run ${charts.runId}: w and b of the global and local models over ${snap.rounds.length} round(s).`;
  return `Run ${charts.runId}: federated loss per round on a log scale.`;
}

// --- the loop: poll the running run, notice runs started elsewhere --------------

let tick = 0;
async function loop() {
  const started = Date.now();
  try {
    await pollRun();
    if (tick % HEALTH_EVERY === 0) await checkServer();
  } catch (e) {
    // The server may be restarting: keep trying, quietly.
  }
  tick += 1;
  // A poll that drew new charts took a while already: poll again sooner.
  setTimeout(loop, Math.max(0, POLL_MS - (Date.now() - started)));
}

async function checkServer() {
  const { ok, body } = await getJSON("/health");
  if (!ok) return;
  const running = body.running_run_id;
  if (running != null && running !== state.knownRunning) {
    // A run started (here, or by curl): show it unless one is being watched,
    // or another was picked meanwhile.
    const seq = state.selectSeq;
    state.knownRunning = running;
    await loadRunList();
    if (seq === state.selectSeq && (!state.run || state.run.status !== "running")) await selectRun(running);
  }
  if (running == null) {
    state.knownRunning = null;
    // Probing the clients shares the server's connections with a run, so
    // the page only probes them between runs; the list of runs is refreshed
    // then too (a short run started by curl may have come and gone).
    if (Date.now() - state.lastIdleRefresh > IDLE_REFRESH_MS) {
      state.lastIdleRefresh = Date.now();
      await Promise.all([loadClients(), loadRunList()]);
    }
  }
}

// --- wiring -------------------------------------------------------------------------------

function setUp() {
  const form = $("#start-form");
  form.addEventListener("submit", submitStart);
  form.addEventListener("input", (e) => {
    const field = e.target.closest(".field");
    const p = field && field.querySelector(".field-error");
    if (p) p.textContent = "";
    e.target.removeAttribute("aria-invalid");
  });
  for (const kind of ["strategy", "aggregator"]) {
    $(`#f-${kind}`).addEventListener("change", () => showChoice(kind));
    showChoice(kind);  // a browser may restore another choice than the page's default
  }
  $("#compare-form").addEventListener("submit", submitCompare);
  $("#clients-refresh").addEventListener("click", loadClients);
  $("#run-stop").addEventListener("click", () => runAction("stop"));
  $("#run-resume").addEventListener("click", () => runAction("resume"));
  $("#run-select").addEventListener("change", (e) => { if (e.target.value) selectRun(Number(e.target.value)); });
  $("#rounds tbody").addEventListener("click", (e) => {
    const button = e.target.closest("button[data-round]");
    if (!button) return;
    selectRound(Number(button.dataset.round), false);  // picked by hand: stay on it
    $("#round-section").focus();
  });
  const step = (delta) => {
    if (!state.selected) return;
    const i = state.rounds.findIndex((x) => x.round === state.selected) + delta;
    if (i < 0 || i >= state.rounds.length) return;
    selectRound(state.rounds[i].round);
  };
  $("#round-prev").addEventListener("click", () => step(-1));
  $("#round-next").addEventListener("click", () => step(1));
  $("#round-input").addEventListener("change", (e) => {
    const n = Number(e.target.value);
    if (state.rounds.some((x) => x.round === n)) {
      selectRound(n);
    } else render();  // back to the round shown
  });
  $("#follow").addEventListener("change", (e) => {
    state.follow = e.target.checked;
    if (state.follow && state.rounds.length) state.selected = lastRound(state.rounds);
    render();
  });
  $("#clients-filter").addEventListener("input", (e) => {
    state.clientFilter = e.target.value;
    render();
  });
}

async function main() {
  setUp();
  state.lastIdleRefresh = Date.now();
  loadClients();
  const runs = await loadRunList();
  if (runs && runs.length) {
    state.knownRunning = runs[0].status === "running" ? runs[0].run_id : null;
    await selectRun(runs[0].run_id);
  }
  loop();
}

document.addEventListener("DOMContentLoaded", main);
