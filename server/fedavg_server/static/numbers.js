// The page's numbers and DOM helpers (see app.js for the whole page).
"use strict";

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
  if (a >= 1e-3 && a < 1e6) {
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
// The model as an equation, as fmt_line in fedavg/trace.py writes it: y = w·x − |b| for a
// negative term (never "+ -1"), y = w₁·x1 + w₂·x2 + … + b with several features.
function fmtLine(w, b) {
  const ws = asList(w);
  const xs = ws.length === 1 ? ["x"] : ws.map((_, j) => `x${j + 1}`);
  const term = (v) => {
    v = Number(v);
    return v < 0 || Object.is(v, -0) ? `− ${fmt(-v)}` : `+ ${fmt(v)}`;
  };
  return `y = ${fmt(ws[0])}·${xs[0]}` + ws.slice(1).map((v, j) => ` ${term(v)}·${xs[j + 1]}`).join("") + ` ${term(b)}`;
}


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
