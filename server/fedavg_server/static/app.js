// Raw FedAvg: the live page. Plain JavaScript, no framework: it reads the
// server's JSON API and writes the FedAvg arithmetic with the real numbers.
"use strict";

const POLL_MS = 250;         // a round shows within a second of completing
const HEALTH_EVERY = 4;      // ticks between /health checks (a run started elsewhere)
const IDLE_REFRESH_MS = 5000; // between runs: the clients' health and the list of runs
const CHARTS_EVERY_MS = 1000; // redraw charts at most this often while rounds arrive

// --- numbers, written exactly as the server's log writes them ----------------

// The exact decimal value of a finite double: x = int / 10^scale. Python's
// format() rounds that exact value half-to-even; JS's toFixed and
// toExponential round ties up, so they can differ (0.0078125 → 0.007812 in
// Python, 0.007813 in JS). BigInt gives the exact digits to round ourselves.
function exactDecimal(x) {
  const view = new DataView(new ArrayBuffer(8));
  view.setFloat64(0, x);
  const hi = view.getUint32(0), lo = view.getUint32(4);
  const expBits = (hi >>> 20) & 0x7ff;
  let mant = (BigInt(hi & 0xfffff) << 32n) | BigInt(lo);
  let e2 = -1074;
  if (expBits !== 0) { mant |= 1n << 52n; e2 = expBits - 1075; }
  if (e2 >= 0) return { int: mant << BigInt(e2), scale: 0 };
  return { int: mant * 5n ** BigInt(-e2), scale: -e2 };  // m·2^-k = m·5^k / 10^k
}

// n / 10^shift rounded half to even (shift may be negative: multiply).
function roundShift(n, shift) {
  if (shift <= 0) return n * 10n ** BigInt(-shift);
  const d = 10n ** BigInt(shift);
  const q = n / d, r = n % d;
  if (2n * r > d || (2n * r === d && q % 2n === 1n)) return q + 1n;
  return q;
}

// Python's f"{x:.6f}" / f"{x:.6e}" as fmt() in fedavg/aggregation.py picks them.
function fmt(x) {
  x = Number(x);
  if (Number.isNaN(x)) return "nan";
  if (!Number.isFinite(x)) return x > 0 ? "inf" : "-inf";
  const sign = x < 0 || Object.is(x, -0) ? "-" : "";
  const a = Math.abs(x);
  if (a === 0) return sign + "0.000000";
  const { int, scale } = exactDecimal(a);
  if (a >= 1e-3 && a < 1e7) {
    const digits = roundShift(int, scale - 6).toString().padStart(7, "0");
    return `${sign}${digits.slice(0, -6)}.${digits.slice(-6)}`;
  }
  // 7 significant digits: d.dddddd e±XX
  let e = int.toString().length - 1 - scale;
  let n = roundShift(int, int.toString().length - 7);
  if (n >= 10000000n) { n /= 10n; e += 1; }  // 9.9999995 → 10.00000: one more digit
  const s = n.toString();
  const exp = `${e < 0 ? "-" : "+"}${String(Math.abs(e)).padStart(2, "0")}`;
  return `${sign}${s[0]}.${s.slice(1)}e${exp}`;
}

// w is a number with one feature, a list with several (like fmt_model).
function fmtW(w) {
  return Array.isArray(w) ? `[${w.map(fmt).join(", ")}]` : fmt(w);
}
const asList = (w) => (Array.isArray(w) ? w : [w]);


// --- small DOM helpers --------------------------------------------------------

const $ = (sel, root = document) => root.querySelector(sel);
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c);
  return node;
}
const num = (text, field) => el("td", { class: "num", dataset: field ? { field } : {}, text });

async function getJSON(url, options = {}) {
  const resp = await fetch(url, { cache: "no-store", ...options });
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  return { status: resp.status, ok: resp.ok, body };
}

// --- state ------------------------------------------------------------------------

const state = {
  run: null,        // the selected run without its rounds
  rounds: [],       // its rounds, in order
  selected: null,   // the round number shown in the arithmetic
  knownRunning: null,
  charts: { timer: null, last: 0, busy: false, urls: {} },
  lastIdleRefresh: 0,
  selectSeq: 0,     // bumped by every selectRun: a slower, older answer must not win
};

// --- the federation ------------------------------------------------------------

async function loadClients() {
  const { ok, body } = await getJSON("/clients");
  if (!ok) return;
  const tbody = $("#clients tbody");
  let up = 0, total = 0;
  for (const c of body.clients) {
    let row = tbody.querySelector(`tr[data-url="${CSS.escape(c.url)}"]`);
    if (!row) continue;
    row.dataset.status = c.status;
    $('[data-field="client_id"]', row).textContent = c.client_id;
    $('[data-field="url"]', row).hidden = c.client_id === c.url;  // a client that never said its name
    const status = $('[data-field="status"]', row);
    status.textContent = c.status === "up" ? "up" : `down: ${c.reason}`;
    status.className = c.status;
    $('[data-field="n_k"]', row).textContent = c.n_k ?? "–";
    if (c.status === "up") { up += 1; total += c.n_k; }
  }
  $("#clients-summary").textContent =
    `${up} of ${body.clients.length} client(s) up; N = ${total} samples among those that are up.`;
}

// --- runs ---------------------------------------------------------------------------

async function loadRunList(selectId) {
  const { ok, body } = await getJSON("/runs");
  if (!ok) return;
  const select = $("#run-select");
  const current = selectId ?? (state.run && state.run.run_id);
  const options = body.runs.map((r) => el("option", {
    value: r.run_id, text: `Run ${r.run_id}: ${r.status}, ${r.rounds_completed}/${r.settings.rounds} rounds`,
  }));
  if (!options.length) options.push(el("option", { value: "", text: "no runs yet" }));
  // Rebuilt only when something changed: not under the hands of someone choosing.
  const text = (opts) => opts.map((o) => `${o.value} ${o.textContent}`).join("\n");
  if (text(options) !== text([...select.options])) select.replaceChildren(...options);
  if (current != null) select.value = String(current);
  updateCompareList(body.runs);
  return body.runs;
}

async function selectRun(runId) {
  const seq = ++state.selectSeq;
  const { ok, body } = await getJSON(`/runs/${runId}`);
  if (!ok || seq !== state.selectSeq) return;
  const { rounds, ...run } = body;
  state.run = run;
  state.rounds = rounds;
  state.selected = null;
  $("#run-select").value = String(run.run_id);
  $("#downloads").hidden = false;
  $("#download-json").href = `/runs/${run.run_id}`;
  $("#download-json").setAttribute("download", `fedavg-run-${run.run_id}.json`);
  $("#download-csv").href = `/runs/${run.run_id}?format=csv`;
  $("#download-csv").setAttribute("download", `fedavg-run-${run.run_id}.csv`);
  $("#rounds tbody").replaceChildren();
  appendRoundRows(rounds);
  showRunStatus();
  selectRound(rounds.length ? rounds[rounds.length - 1].round : null);
}

// Poll the selected run for the rounds after the last one we have. The last
// one is asked for again: its federated loss is measured one round later.
async function pollRun() {
  const run = state.run;
  if (!run || run.status !== "running") return;
  const have = state.rounds.length ? state.rounds[state.rounds.length - 1].round : 0;
  const { ok, body } = await getJSON(`/runs/${run.run_id}?since=${Math.max(0, have - 1)}`);
  if (!ok || !state.run || state.run.run_id !== run.run_id) return;
  const { rounds, ...meta } = body;
  state.run = meta;
  mergeRounds(rounds);
  showRunStatus();
  if (meta.status !== "running") {
    loadRunList();
    loadClients();
  }
}

function mergeRounds(incoming) {
  const fresh = [];
  for (const r of incoming) {
    const i = state.rounds.findIndex((x) => x.round === r.round);
    if (i >= 0) {
      if (state.rounds[i].federated_loss !== r.federated_loss) {
        state.rounds[i] = r;
        updateRoundRow(r);
        if (state.selected === r.round) renderMath();
        scheduleCharts();
      }
    } else {
      state.rounds.push(r);
      fresh.push(r);
    }
  }
  if (!fresh.length) return;
  appendRoundRows(fresh);
  const last = fresh[fresh.length - 1].round;
  if ($("#follow").checked || state.selected === null) selectRound(last, false);
  else { updateRoundNav(); scheduleCharts(); }
}

function showRunStatus() {
  const run = state.run;
  const planned = run.settings.rounds;
  const done = state.rounds.length;
  const s = run.settings;
  const strategy = strategyText(s);
  $("#run-status").textContent =
    `Run ${run.run_id} is ${run.status}: ${strategy}, lr=${fmt(s.lr)}, ${s.local_epochs} local epoch(s)` +
    `${s.batch_size ? `, batch size ${s.batch_size}` : ""}, fraction=${fmt(s.fraction)}, ` +
    `min clients ${s.min_clients}, seed ${s.seed}.`;
  $("#run-status").dataset.status = run.status;
  const progress = $("#progress");
  progress.max = planned;
  progress.value = done;
  $("#progress-text").textContent = `${done} / ${planned} rounds`;
  $("#run-error").textContent = run.error ? `Run ${run.status}: ${run.error}` : "";
  // A running run can be stopped after its round; an interrupted or failed
  // one resumed from its last completed round.
  $("#run-stop").hidden = run.status !== "running";
  $("#run-resume").hidden = !["interrupted", "failed"].includes(run.status);
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
  $("#run-error").textContent = "";
  const body = action === "resume" ? JSON.stringify({ wait: false }) : "{}";
  try {
    const resp = await getJSON(`/runs/${run.run_id}/${action}`, { method: "POST", headers: authHeaders(), body });
    if (!resp.ok) {
      $("#run-error").textContent = resp.body && resp.body.error ? resp.body.error : `HTTP ${resp.status}`;
      return;
    }
    if (action === "resume") state.knownRunning = run.run_id;
    await selectRun(run.run_id);
  } catch (e) {
    $("#run-error").textContent = `The server did not answer: ${e.message}`;
  }
}

// --- the table of all rounds ----------------------------------------------------

function roundRowCells(r) {
  return [
    el("th", { scope: "row" }, el("button", { type: "button", class: "link", dataset: { round: r.round },
                                              "aria-label": `Show round ${r.round}`, text: r.round })),
    num(String(r.N)),
    num(String(r.participants.length)),
    num(String(r.dropped.length)),
    num(fmtW(r.global_model.w), "w"),
    num(fmt(r.global_model.b), "b"),
    num(r.federated_loss == null ? "–" : fmt(r.federated_loss), "federated_loss"),
  ];
}

function appendRoundRows(rounds) {
  const frag = document.createDocumentFragment();
  for (const r of rounds) frag.append(el("tr", { dataset: { round: r.round } }, ...roundRowCells(r)));
  $("#rounds tbody").append(frag);
}

function updateRoundRow(r) {
  const row = $(`#rounds tbody tr[data-round="${r.round}"]`);
  if (row) row.replaceChildren(...roundRowCells(r));
  markSelectedRow();
}

function markSelectedRow() {
  for (const row of document.querySelectorAll("#rounds tbody tr[aria-current]")) row.removeAttribute("aria-current");
  const row = $(`#rounds tbody tr[data-round="${state.selected}"]`);
  if (row) row.setAttribute("aria-current", "true");
}

// --- the selected round: the weighted average, written out ---------------------

// chartsNow: redraw at once (a click); while following a live run the
// charts keep to their own pace instead.
function selectRound(roundNo, chartsNow = true) {
  state.selected = roundNo;
  updateRoundNav();
  renderMath();
  markSelectedRow();
  scheduleCharts(chartsNow);
}

function updateRoundNav() {
  const input = $("#round-input");
  const first = state.rounds.length ? state.rounds[0].round : 0;
  const last = state.rounds.length ? state.rounds[state.rounds.length - 1].round : 0;
  input.min = String(first || 1);
  input.max = String(last || 1);
  input.value = state.selected ?? "";
  $("#round-prev").disabled = !state.selected || state.selected <= first;
  $("#round-next").disabled = !state.selected || state.selected >= last;
  $("#round-number").textContent = state.selected ?? "–";
}

// [w..., b] as the page writes a model: w one number with one feature, a list with several.
const splitWB = (v) => ({ w: v.length === 2 ? v[0] : v.slice(0, -1), b: v[v.length - 1] });
const fmtMatrix = (m) => `[${m.map((row) => asList(row).map(fmt).join(" ")).join("; ")}]`;

// The columns of the client table: what each client sent (its local model,
// gradient, control variate, steps or sums, whichever the strategy asks for)
// and, when the strategy averages local models, its share n_k/N · W_k.
function clientColumns(r) {
  const ps = r.participants;
  const has = (key) => ps.some((p) => p[key] != null);
  const cols = [];
  const pair = (key, headW, headB) => {
    const field = key === "local_model" ? "" : `${key}_`;
    cols.push({ head: headW, field: `${field}w`, cell: (p) => (p[key] ? fmtW(p[key].w) : "–") });
    cols.push({ head: headB, field: `${field}b`, cell: (p) => (p[key] ? fmt(p[key].b) : "–") });
  };
  if (has("local_model")) pair("local_model", "local w_k", "local b_k");
  if (has("gradient")) pair("gradient", "gradient ∂L_k/∂w", "∂L_k/∂b");
  if (has("control_delta")) pair("control_delta", "Δc_k (w)", "Δc_k (b)");
  if (has("steps")) {
    cols.push({ head: "steps τ_k", field: "steps", cell: (p) => (p.steps == null ? "–" : String(p.steps)) });
  }
  if (has("stats")) {
    cols.push({ head: "Σx̃x̃ᵀ", field: "xtx", cell: (p) => (p.stats ? fmtMatrix(p.stats.xtx) : "–") });
    cols.push({ head: "Σx̃y", field: "xty", cell: (p) => (p.stats ? fmtMatrix([p.stats.xty]) : "–") });
  }
  if (!cols.length) pair("local_model", "local w_k", "local b_k");
  return cols;
}

function clientTable(r) {
  const cols = clientColumns(r);
  const withTerms = r.terms.length > 0;
  const heads = ["Client", "n_k", "n_k/N", ...cols.map((c) => c.head),
                 ...(withTerms ? ["n_k/N · w_k", "n_k/N · b_k"] : [])];
  const table = el("table", { id: "terms" },
    el("caption", {}, "Each client's share n", el("sub", { text: "k" }), "/N and what it sent back" +
      (withTerms ? ": its local model W" : "."), ...(withTerms ? [el("sub", { text: "k" }), "."] : [])),
    el("thead", {}, el("tr", {}, ...heads.map((h) => el("th", { scope: "col", text: h })))));
  const body = el("tbody");
  const total = r.N;
  r.participants.forEach((p, k) => {
    const t = r.terms[k];
    body.append(el("tr", { dataset: { client: p.client_id } },
      el("th", { scope: "row", title: p.url, text: p.client_id }),
      num(String(p.data_size), "n_k"),
      num(fmt(t ? t.weight : p.data_size / total), "weight"),
      ...cols.map((c) => num(c.cell(p), c.field)),
      ...(withTerms ? [num(t ? fmtW(t.w) : "–", "term_w"), num(t ? fmt(t.b) : "–", "term_b")] : [])));
  });
  const blanks = cols.map(() => num(""));
  table.append(body, el("tfoot", {}, el("tr", {},
    el("th", { scope: "row", text: withTerms ? "Σ = W_t+1" : "Σ n_k = N" }), num(String(r.N), "N"), num(""),
    ...blanks,
    ...(withTerms ? [num(fmtW(r.global_model.w), "global_w"), num(fmt(r.global_model.b), "global_b")] : []))));
  return table;
}

// The strategy's state after the round (SCAFFOLD's c, FedAdam's m and v, …): [w..., b] each.
function serverStateTable(r) {
  const keys = Object.keys(r.server_state);
  return el("table", { id: "server-state" },
    el("caption", { text: `The server's state after round ${r.round}, carried into the next round.` }),
    el("thead", {}, el("tr", {}, ...["", "w", "b"].map((h) => el("th", { scope: "col", text: h })))),
    el("tbody", {}, ...keys.map((key) => {
      const { w, b } = splitWB(r.server_state[key]);
      return el("tr", { dataset: { state: key } }, el("th", { scope: "row", text: key }),
        num(fmtW(w), "w"), num(fmt(b), "b"));
    })));
}

function renderMath() {
  const box = $("#math");
  const r = state.rounds.find((x) => x.round === state.selected);
  if (!r) {
    box.replaceChildren(el("p", { text: state.run ? "This run has no completed round yet." :
      "No round to show yet: start a run, or pick one." }));
    return;
  }
  const d = asList(r.global_model.w).length;
  const strategy = r.strategy || "fedavg";  // rounds stored before strategies were FedAvg's
  // The strategy's computation as the server wrote it in its log (the record's "math").
  const lines = r.math;

  const inModel = r.global_model_in;
  const parts = [
    el("p", { id: "strategy-line" }, "Strategy ",
      el("strong", { dataset: { field: "strategy" }, text: strategy }), ": ",
      el("code", { dataset: { field: "summary" }, text: strategySummary(strategy) })),
    el("p", {}, "Global model in (W", el("sub", { text: "t" }), "): ",
      el("code", { dataset: { field: "model_in" }, text: inModel ? `w=${fmtW(inModel.w)} b=${fmt(inModel.b)}` : "–" })),
    clientTable(r),
    el("pre", { class: "formula", id: "average-lines", "aria-label": `The computation of ${strategy}, written out` },
      lines.join("\n")),
  ];
  if (r.server_state && Object.keys(r.server_state).length) parts.push(serverStateTable(r));
  parts.push(
    el("p", {}, "Global model out (W", el("sub", { text: "t+1" }), "): ",
      el("code", { dataset: { field: "model_out" },
                   text: d === 1 ? `y = ${fmt(r.global_model.w)}·x + ${fmt(r.global_model.b)}`
                                 : `w=${fmtW(r.global_model.w)} b=${fmt(r.global_model.b)}` })),
    el("p", {}, "Federated loss of this model, L = Σ n", el("sub", { text: "k" }), "/N · L", el("sub", { text: "k" }),
      ": ", el("code", { dataset: { field: "federated_loss" },
                         text: r.federated_loss == null ? "not measured yet (the next round measures it)"
                                                        : fmt(r.federated_loss) })));
  if (r.dropped.length) {
    parts.push(el("h3", { text: `Dropped from round ${r.round}` }),
      el("ul", { id: "dropped" }, ...r.dropped.map((x) => el("li", { dataset: { client: x.client_id } },
        el("strong", { text: x.client_id }), x.client_id !== x.url ? ` (${x.url})` : "", ": ",
        el("span", { dataset: { field: "reason" }, text: x.reason })))));
  } else {
    parts.push(el("p", { class: "quiet", text: "No client was dropped from this round." }));
  }
  box.replaceChildren(...parts);
}

// --- charts: SVG drawn by the server (matplotlib) ----------------------------------

// Fetched, not linked: the URL of a running run's chart stays the same while
// its picture changes, and an <img> would not ask again.
function scheduleCharts(now = false) {
  const c = state.charts;
  if (c.timer) { if (!now) return; clearTimeout(c.timer); }
  const wait = now ? 0 : Math.max(0, CHARTS_EVERY_MS - (Date.now() - c.last));
  c.timer = setTimeout(drawCharts, wait);
}

async function drawCharts() {
  const c = state.charts;
  c.timer = null;
  if (c.busy) { scheduleCharts(); return; }
  if (!state.run) return;
  c.busy = true;
  c.last = Date.now();
  const runId = state.run.run_id;
  const selected = state.selected;
  const q = selected ? `?round=${selected}` : "";
  try {
    await Promise.all([...document.querySelectorAll("img[data-plot]")].map(async (img) => {
      const resp = await fetch(`/runs/${runId}/plots/${img.dataset.plot}.svg${q}`, { cache: "no-store" });
      if (!resp.ok) return;
      const url = URL.createObjectURL(await resp.blob());
      img.src = url;
      if (c.urls[img.id]) URL.revokeObjectURL(c.urls[img.id]);
      c.urls[img.id] = url;
      img.alt = chartAlt(img.dataset.plot, runId, selected);
    }));
  } finally {
    c.busy = false;
  }
}

// What the chart shows, in words, for those who cannot see it.
function chartAlt(name, runId, selected) {
  const r = state.rounds.find((x) => x.round === selected);
  if (name === "models") {
    return r ? `Run ${runId}, round ${r.round}: the clients' local model lines and the global model ` +
               `y = ${fmtW(r.global_model.w)}·x + ${fmt(r.global_model.b)}.` : `Run ${runId}: no round yet.`;
  }
  if (name === "params") return `Run ${runId}: w and b of the global and local models over ${state.rounds.length} round(s).`;
  return `Run ${runId}: federated loss per round on a log scale.`;
}

// --- the form -------------------------------------------------------------------------

const JSON_NUMBER = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?$/;

function clearErrors(form) {
  for (const p of form.querySelectorAll(".field-error")) p.textContent = "";
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  $("#form-error").textContent = "";
}

// The field of that name that is in use: a strategy's setting (server_lr, …)
// has an input in each strategy's fieldset, and only the chosen one is enabled.
const enabled = (nodes) => [...nodes].find((n) => !n.closest("fieldset:disabled"));

function showFieldError(form, name, message) {
  const where = enabled(form.querySelectorAll(`[data-error-for="${CSS.escape(name)}"]`));
  const input = enabled(form.querySelectorAll(`[name="${CSS.escape(name)}"]`));
  if (!where || !input) return false;
  where.textContent = message;
  input.setAttribute("aria-invalid", "true");
  input.focus();
  return true;
}

// The API's errors read "field: what is wrong": shown next to that field.
function showApiError(form, message) {
  const colon = message.indexOf(": ");
  if (colon > 0 && showFieldError(form, message.slice(0, colon), message.slice(colon + 2))) return;
  $("#form-error").textContent = message;
}

// The body of POST /start: each number exactly as typed (a JSON literal, so
// a long seed is not rounded through a float); empty fields take the defaults.
function startBody(form) {
  const parts = ['"wait": false', `"strategy": ${JSON.stringify($("#f-strategy").value)}`];
  for (const input of form.querySelectorAll('input[type="number"]')) {
    if (input.matches(":disabled")) continue;  // another strategy's settings
    const raw = input.value.trim();
    if (input.validity.badInput) return { error: [input.name, "must be a number"] };
    if (raw === "") continue;
    let literal = raw;
    if (!JSON_NUMBER.test(literal)) {
      const n = Number(raw);
      if (!Number.isFinite(n)) return { error: [input.name, "must be a number"] };
      literal = String(n);
    }
    parts.push(`${JSON.stringify(input.name)}: ${literal}`);
  }
  return { body: `{${parts.join(", ")}}` };
}

async function submitStart(event) {
  event.preventDefault();
  const form = event.currentTarget;
  clearErrors(form);
  const { body, error } = startBody(form);
  if (error) { showFieldError(form, ...error); return; }
  const headers = authHeaders();
  const button = $("#start-button");
  button.disabled = true;
  try {
    const resp = await getJSON("/start", { method: "POST", headers, body });
    if (resp.status === 202) {
      state.knownRunning = resp.body.run_id;
      await loadRunList(resp.body.run_id);
      await selectRun(resp.body.run_id);
    } else if (resp.status === 401) {
      if (!showFieldError(form, "token", resp.body.error)) $("#form-error").textContent = resp.body.error;
    } else if (resp.status === 409 && resp.body.run_id != null) {
      $("#form-error").textContent = `${resp.body.error}: showing it.`;
      await selectRun(resp.body.run_id);
    } else {
      showApiError(form, resp.body && resp.body.error ? resp.body.error : `HTTP ${resp.status}`);
    }
  } catch (e) {
    $("#form-error").textContent = `The server did not answer: ${e.message}`;
  } finally {
    button.disabled = false;
  }
}

// Show and enable the chosen strategy's settings only, with its formula.
function showStrategy() {
  const name = $("#f-strategy").value;
  for (const fieldset of document.querySelectorAll("fieldset[data-strategy]")) {
    const mine = fieldset.dataset.strategy === name;
    fieldset.hidden = !mine;
    fieldset.disabled = !mine;
  }
  $("#strategy-summary").textContent = strategySummary(name);
}

// --- comparing runs: their federated loss on one chart -------------------------------

function updateCompareList(runs) {
  const list = $("#compare-runs");
  const checked = new Set([...list.querySelectorAll("input:checked")].map((i) => i.value));
  const items = runs.map((r) => el("li", {}, el("label", {},
    el("input", { type: "checkbox", name: "runs", value: r.run_id, id: `compare-${r.run_id}`,
                  checked: checked.has(String(r.run_id)) }),
    ` Run ${r.run_id}: ${r.settings.strategy || "fedavg"}, ${r.status}, ${r.rounds_completed} round(s)`)));
  if (!items.length) items.push(el("li", { class: "quiet", text: "no runs yet" }));
  const text = (nodes) => nodes.map((n) => n.textContent).join("\n");
  if (text(items) !== text([...list.children])) list.replaceChildren(...items);
}

async function submitCompare(event) {
  event.preventDefault();
  // Oldest first, whatever the list's order: the chart's colours follow the runs' order.
  const ids = [...$("#compare-runs").querySelectorAll("input:checked")].map((i) => Number(i.value))
    .sort((a, b) => a - b);
  const error = $("#compare-error");
  error.textContent = "";
  const max = Number($("#compare-runs").dataset.max);
  if (ids.length < 1) { error.textContent = "Pick at least one run."; return; }
  if (ids.length > max) { error.textContent = `At most ${max} runs on one chart, ${ids.length} picked.`; return; }
  const resp = await fetch(`/compare.svg?runs=${ids.join(",")}`, { cache: "no-store" });
  if (!resp.ok) {
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    error.textContent = body && body.error ? body.error : `HTTP ${resp.status}`;
    return;
  }
  const img = $("#chart-compare");
  const old = img.src;
  img.src = URL.createObjectURL(await resp.blob());
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  img.alt = `Federated loss per round, log scale, of runs ${ids.join(", ")}.`;
  img.dataset.runs = ids.join(",");
  $("#compare-figure").hidden = false;
}

// --- the loop: poll the running run, notice runs started elsewhere --------------

let tick = 0;
async function loop() {
  try {
    await pollRun();
    if (tick % HEALTH_EVERY === 0) await checkServer();
  } catch (e) {
    // The server may be restarting: keep trying, quietly.
  }
  tick += 1;
  setTimeout(loop, POLL_MS);
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
  $("#f-strategy").addEventListener("change", showStrategy);
  showStrategy();  // a browser may restore another choice than the page's default
  $("#compare-form").addEventListener("submit", submitCompare);
  $("#clients-refresh").addEventListener("click", loadClients);
  $("#run-stop").addEventListener("click", () => runAction("stop"));
  $("#run-resume").addEventListener("click", () => runAction("resume"));
  $("#run-select").addEventListener("change", (e) => { if (e.target.value) selectRun(Number(e.target.value)); });
  $("#rounds tbody").addEventListener("click", (e) => {
    const button = e.target.closest("button[data-round]");
    if (!button) return;
    $("#follow").checked = false;  // the user picked a round: stay on it
    selectRound(Number(button.dataset.round));
    $("#round-section").focus();
  });
  const step = (delta) => {
    if (!state.selected) return;
    const i = state.rounds.findIndex((x) => x.round === state.selected) + delta;
    if (i < 0 || i >= state.rounds.length) return;
    $("#follow").checked = i === state.rounds.length - 1;
    selectRound(state.rounds[i].round);
  };
  $("#round-prev").addEventListener("click", () => step(-1));
  $("#round-next").addEventListener("click", () => step(1));
  $("#round-input").addEventListener("change", (e) => {
    const n = Number(e.target.value);
    if (state.rounds.some((x) => x.round === n)) {
      $("#follow").checked = n === state.rounds[state.rounds.length - 1].round;
      selectRound(n);
    } else updateRoundNav();
  });
  $("#follow").addEventListener("change", (e) => {
    if (e.target.checked && state.rounds.length) selectRound(state.rounds[state.rounds.length - 1].round);
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

window.fedavgFmt = fmt;  // the page's number format, for checking it against the server's
document.addEventListener("DOMContentLoaded", main);
