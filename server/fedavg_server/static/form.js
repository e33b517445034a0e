// The start form and the comparison of runs (see app.js for the whole page).
"use strict";

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

function showFieldError(form, name, message, focus = true) {
  const where = enabled(form.querySelectorAll(`[data-error-for="${CSS.escape(name)}"]`));
  const input = enabled(form.querySelectorAll(`[name="${CSS.escape(name)}"]`));
  if (!where || !input) return false;
  where.textContent = message;
  input.setAttribute("aria-invalid", "true");
  if (focus) input.focus();
  return true;
}

// The API's 400: "error" reads "field: what is wrong"; with several bad
// fields "errors" lists each as {field, message}. Each goes next to its
// field (the first one focused); one that names no field goes under the form.
function showApiErrors(form, body) {
  let list = body.errors;
  if (!Array.isArray(list)) {
    const colon = body.error.indexOf(": ");
    list = [colon > 0 ? { field: body.error.slice(0, colon), message: body.error.slice(colon + 2) }
                      : { field: "", message: body.error }];
  }
  const elsewhere = [];
  list.forEach((e, i) => {
    if (!(e.field && showFieldError(form, e.field, e.message, i === 0))) {
      elsewhere.push(e.field ? `${e.field}: ${e.message}` : e.message);
    }
  });
  $("#form-error").textContent = elsewhere.join(" ");
}

// The body of POST /start: each number exactly as typed (a JSON literal, so
// a long seed is not rounded through a float); empty fields take the defaults.
// The aggregator only when it is not the default (the weighted mean): a
// strategy that sums its clients' statistics refuses any aggregator at all.
function startBody(form) {
  const parts = ['"wait": false', `"strategy": ${JSON.stringify($("#f-strategy").value)}`];
  const aggregator = $("#f-aggregator");
  if (aggregator.value !== aggregator.dataset.default) parts.push(`"aggregator": ${JSON.stringify(aggregator.value)}`);
  for (const input of form.querySelectorAll('input[type="number"]')) {
    if (input.matches(":disabled")) continue;  // another strategy's or rule's settings
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
      await selectRun(resp.body.run_id);
      loadRunList();
    } else if (resp.status === 401) {
      if (!showFieldError(form, "token", resp.body.error)) $("#form-error").textContent = resp.body.error;
    } else if (resp.status === 409 && resp.body.run_id != null) {
      $("#form-error").textContent = `${resp.body.error}: showing it.`;
      await selectRun(resp.body.run_id);
    } else {
      showApiErrors(form, resp.body && resp.body.error ? resp.body : { error: `HTTP ${resp.status}` });
    }
  } catch (e) {
    $("#form-error").textContent = `The server did not answer: ${e.message}`;
  } finally {
    button.disabled = false;
  }
}

// Show and enable the chosen strategy's (kind "strategy") or robust rule's
// ("aggregator") settings only, with its summary.
function showChoice(kind) {
  const select = $(`#f-${kind}`);
  for (const fieldset of document.querySelectorAll(`fieldset[data-${kind}]`)) {
    const mine = fieldset.dataset[kind] === select.value;
    fieldset.hidden = !mine;
    fieldset.disabled = !mine;
  }
  $(`#${kind}-summary`).textContent = select.selectedOptions[0].dataset.summary;
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
  img.alt = `Federated loss per round, log scale, of runs ${ids.join(", ")}, and their distance to the pooled optimum when an exact run among them knows it.`;
  img.dataset.runs = ids.join(",");
  $("#compare-figure").hidden = false;
}
