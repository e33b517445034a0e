// The selected round, written out: who sent what, the weighted average, the
// strategy's math and its state (see app.js for the whole page).
"use strict";

// --- the selected round: the weighted average, written out ---------------------

// The user picks a round: the table (stay on it), the arrows or the number
// (follow again when it is the latest).
function selectRound(roundNo, follow = roundNo === lastRound(state.rounds)) {
  state.selected = roundNo;
  state.follow = follow;
  return render();
}

function paintRoundNav(snap) {
  const input = $("#round-input");
  const first = snap.rounds.length ? snap.rounds[0].round : 0;
  const last = lastRound(snap.rounds) ?? 0;
  input.min = String(first || 1);
  input.max = String(last || 1);
  if (document.activeElement !== input) input.value = snap.selected ?? "";
  $("#round-prev").disabled = !snap.selected || snap.selected <= first;
  $("#round-next").disabled = !snap.selected || snap.selected >= last;
  $("#round-number").textContent = snap.selected ?? "–";
  $("#follow").checked = snap.follow;
}

// [w..., b] as the page writes a model: w one number with one feature, a list with several.
const splitWB = (v) => ({ w: v.length === 2 ? v[0] : v.slice(0, -1), b: v[v.length - 1] });
const fmtMatrix = (m) => `[${m.map((row) => asList(row).map(fmt).join(" ")).join("; ")}]`;

// Every field a strategy's clients send back, as fedavg/strategies/fields.py
// declares them (name, kind, column heads): the page names none by hand.
const REPLY_FIELDS = JSON.parse(document.getElementById("reply-fields").textContent);

// A declared field's cells, by its kind: [text of a participant's value, its data-field].
// The local model's are the seed table's "w" and "b"; another model's are prefixed by its name.
const KIND_CELLS = {
  model: (f) => {
    const key = f.name === "local_model" ? "" : `${f.name}_`;
    return [[(v) => fmtW(v.w), `${key}w`], [(v) => fmt(v.b), `${key}b`]];
  },
  count: (f) => [[(v) => String(v), f.name]],
  stats: () => [[(v) => fmtMatrix(v.xtx), "xtx"], [(v) => fmtMatrix([v.xty]), "xty"]],
};

// The columns of the client table: what each client sent (its local model,
// gradient, control variate, steps or sums, whichever the strategy asks for)
// and, when the strategy averages local models, its share n_k/N · W_k.
function clientColumns(r) {
  const ps = r.participants;
  const sent = REPLY_FIELDS.filter((f) => ps.some((p) => p[f.name] != null));
  return (sent.length ? sent : REPLY_FIELDS.slice(0, 1)).flatMap((f) =>
    KIND_CELLS[f.kind](f).map(([text, field], i) => ({
      head: f.columns[i], field, cell: (p) => (p[f.name] == null ? "–" : text(p[f.name])),
    })));
}

function clientTable(r) {
  const cols = clientColumns(r);
  const withTerms = r.terms.length > 0;
  const heads = ["Client", "n_k", "n_k/N", ...cols.map((c) => c.head),
                 ...(withTerms ? ["n_k/N · w_k", "n_k/N · b_k"] : [])];
  const caption = r.secagg
    ? el("caption", { text: "Secure aggregation: each client sent its input masked, and the server learnt only " +
                            "their sum (the math below): no client's n_k or model." })
    : el("caption", {}, "Each client's share n", el("sub", { text: "k" }), "/N and what it sent back" +
      (withTerms ? ": its local model W" : "."), ...(withTerms ? [el("sub", { text: "k" }), "."] : []));
  const table = el("table", { id: "terms" }, caption,
    el("thead", {}, el("tr", {}, ...heads.map((h) => el("th", { scope: "col", text: h })))));
  const body = el("tbody");
  const total = r.N;
  r.participants.forEach((p, k) => {
    const t = r.terms[k];
    body.append(el("tr", { dataset: { client: p.client_id } },
      el("th", { scope: "row", title: p.url, text: p.client_id }),
      num(p.data_size == null ? "masked" : String(p.data_size), "n_k"),
      num(t ? fmt(t.weight) : p.data_size == null ? "–" : fmt(p.data_size / total), "weight"),
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

// A round of more than 100 clients (records.SUMMARY_ABOVE): its record counts them, and the page shows
// the counts, the mean by groups of n_k, the largest weights and a link to every client's row (CSV).
function summaryParts(r, runId) {
  const s = r.summary;
  const csv = `/runs/${runId}/rounds/${r.round}/clients.csv`;
  const parts = [el("p", { id: "summary-counts" },
    el("span", { dataset: { field: "counts" },
                 text: `${s.sampled} clients sampled: ${s.contributed} contributed (N = ${r.N}), ` +
                       `${s.dropped} dropped. ` }),
    "Too many to list here: ", el("a", { id: "clients-csv", href: csv, download: "", text: "every client's row (CSV)" }),
    ".")];
  const g = s.groups;
  if (g) {
    const mean = (m, key) => (m ? (key === "w" ? fmtW(m.w) : fmt(m.b)) : "–");
    parts.push(el("table", { id: "groups" },
      el("caption", { text: `The clients' ${g.field} averaged, Σ n_k/N · x_k, as a sum over groups of n_k: ` +
                            "Σ N_g/N · x̄_g (N_g = Σ n_k in the group, x̄_g its own weighted mean)." }),
      el("thead", {}, el("tr", {}, ...["n_k", "clients", "N_g", "N_g/N", "x̄_g (w)", "x̄_g (b)"].map((h) =>
        el("th", { scope: "col", text: h })))),
      el("tbody", {}, ...g.groups.map((x) => el("tr", { dataset: { group: x.n_k_from } },
        el("th", { scope: "row", text: `${x.n_k_from}–${x.n_k_to}` }), num(String(x.clients), "clients"),
        num(String(x.N), "N_g"), num(fmt(x.N / g.N), "share"), num(mean(x.mean, "w"), "w"),
        num(mean(x.mean, "b"), "b")))),
      el("tfoot", {}, el("tr", {}, el("th", { scope: "row", text: "Σ" }),
        num(String(s.contributed)), num(String(g.N), "N"), num(""), num(mean(g.mean, "w"), "mean_w"),
        num(mean(g.mean, "b"), "mean_b")))));
  }
  if (s.top.length) {
    const cols = clientColumns({ participants: s.top });
    parts.push(el("table", { id: "top" },
      el("caption", { text: `The ${s.top.length} largest weights n_k/N of the round.` }),
      el("thead", {}, el("tr", {}, ...["Client", "n_k", "n_k/N", ...cols.map((c) => c.head)].map((h) =>
        el("th", { scope: "col", text: h })))),
      el("tbody", {}, ...s.top.map((p) => el("tr", { dataset: { client: p.client_id } },
        el("th", { scope: "row", title: p.url, text: p.client_id }), num(String(p.data_size), "n_k"),
        num(fmt(p.weight), "weight"), ...cols.map((c) => num(c.cell(p), c.field)))))));
  }
  return parts;
}

// A summarised round's dropped clients: counted by reason, the first few named.
function droppedSummary(r) {
  const s = r.summary;
  return [el("h3", { text: `Dropped from round ${r.round}: ${s.dropped} clients` }),
    el("ul", { id: "dropped-by-reason" }, ...s.dropped_by_reason.map((x) =>
      el("li", {}, el("strong", { dataset: { field: "clients" }, text: String(x.clients) }), " clients: ",
        el("span", { dataset: { field: "reason" }, text: x.reason })))),
    el("p", { id: "dropped-first" }, `The first ${r.dropped.length}: `,
      r.dropped.map((x) => x.client_id).join(", "),
      s.dropped > r.dropped.length ? ` and ${s.dropped - r.dropped.length} more (in the CSV).` : ".")];
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

function paintMath(snap) {
  const box = $("#math");
  const r = snap.rounds.find((x) => x.round === snap.selected);
  const key = `${snap.run ? snap.run.run_id : ""}|${snap.selected}|${r ? r.federated_loss : ""}`;
  if (key === view.mathKey) return;
  view.mathKey = key;
  box.dataset.round = r ? r.round : "";
  if (!r) {
    box.replaceChildren(el("p", { text: snap.run ? "This run has no completed round yet." :
      "No round to show yet: start a run, or pick one." }));
    return;
  }
  box.replaceChildren(...mathParts(r, snap.run ? snap.run.run_id : null));
}

function mathParts(r, runId) {
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
    ...(r.summary ? summaryParts(r, runId) : [clientTable(r)]),
    el("pre", { class: "formula", id: "average-lines", "aria-label": `The computation of ${strategy}, written out` },
      lines.join("\n")),
  ];
  if (r.server_state && Object.keys(r.server_state).length) parts.push(serverStateTable(r));
  parts.push(
    el("p", {}, "Global model out (W", el("sub", { text: "t+1" }), "): ",
      el("code", { dataset: { field: "model_out" },
                   text: d === 1 ? fmtLine(r.global_model.w, r.global_model.b)
                                 : `w=${fmtW(r.global_model.w)} b=${fmt(r.global_model.b)}` })),
    el("p", {}, "Federated loss of this model, L = Σ n", el("sub", { text: "k" }), "/N · L", el("sub", { text: "k" }),
      ": ", el("code", { dataset: { field: "federated_loss" },
                         text: r.federated_loss == null ? "not measured yet (the next round measures it)"
                                                        : fmt(r.federated_loss) })));
  if ((r.suspicious || []).length) {
    // A flag, not a verdict: an update far larger than the other clients'.
    parts.push(el("h3", { text: `Suspicious updates in round ${r.round}` }),
      el("ul", { id: "suspicious", class: "warning" }, ...r.suspicious.map((x) =>
        el("li", { dataset: { client: x.client_id } }, el("strong", { text: x.client_id }),
          `: its update's norm ${fmt(x.update_norm)} is ${x.ratio.toPrecision(3)}× the others' median`))));
  }
  if (r.summary && r.summary.dropped) {
    parts.push(...droppedSummary(r));
  } else if (r.dropped.length) {
    parts.push(el("h3", { text: `Dropped from round ${r.round}` }),
      el("ul", { id: "dropped" }, ...r.dropped.map((x) => el("li", { dataset: { client: x.client_id } },
        el("strong", { text: x.client_id }), x.client_id !== x.url ? ` (${x.url})` : "", ": ",
        el("span", { dataset: { field: "reason" }, text: x.reason })))));
  } else {
    parts.push(el("p", { class: "quiet", text: "No client was dropped from this round." }));
  }
  return parts;
}
