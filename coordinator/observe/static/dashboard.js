// SplitFT dashboard: one snapshot of the job per server-sent event, drawn whole (table and SVG charts).
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#0b63c4", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0c8599", "#c2255c", "#5c940d",
                 "#364fc7", "#a61e4d", "#087f5b", "#5f3dc4"];
const PART_COLORS = { compute: "#0b63c4", codec: "#a5b4fc", upload: "#e67700", server: "#2b8a3e", network: "#c2255c" };
const PART_NAMES = { compute: "device compute", codec: "encode/decode", upload: "upload", server: "server",
                     network: "download and waiting" };
const M = { l: 54, r: 14, t: 14, b: 36 }, W = 480, H = 240;
const token = new URLSearchParams(location.search).get("token");
const withToken = (path) => (token ? `${path}?token=${encodeURIComponent(token)}` : path);
let colors = {};

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "-";
  if (Math.abs(x) >= 1000) return Math.round(x).toLocaleString("en");
  return Number(x).toPrecision(digits).replace(/\.?0+$/, "");
}

function bytes(n) {
  if (n >= 1e9) return `${fmt(n / 1e9)} GB`;
  if (n >= 1e6) return `${fmt(n / 1e6)} MB`;
  if (n >= 1e3) return `${fmt(n / 1e3)} kB`;
  return `${n} B`;
}

// Round tick values between lo and hi, at most about `count`, with the decimals their step needs.
function ticks(lo, hi, count, integer) {
  if (hi <= lo) hi = lo + 1;
  let step = Math.pow(10, Math.floor(Math.log10((hi - lo) / count)));
  for (const m of [1, 2, 5, 10]) { if ((hi - lo) / (step * m) <= count) { step *= m; break; } }
  if (integer) step = Math.max(1, Math.round(step));
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) {
    out.push({ value: v, label: v.toFixed(decimals) });
  }
  return out;
}

// Axes and grid on an emptied SVG; returns the scales.
function axes(svg, x0, x1, y0, y1, { xLabel, yLabel, xInt, yInt }) {
  svg.replaceChildren();
  const sx = (x) => M.l + ((x - x0) / (x1 - x0 || 1)) * (W - M.l - M.r);
  const sy = (y) => H - M.b - ((y - y0) / (y1 - y0 || 1)) * (H - M.t - M.b);
  for (const t of ticks(y0, y1, 5, yInt)) {
    svg.append(el("line", { class: "grid", x1: M.l, x2: W - M.r, y1: sy(t.value), y2: sy(t.value) }));
    svg.append(el("text", { x: M.l - 6, y: sy(t.value) + 4, "text-anchor": "end" }, t.label));
  }
  for (const t of ticks(x0, x1, 6, xInt)) {
    svg.append(el("text", { x: sx(t.value), y: H - M.b + 15, "text-anchor": "middle" }, t.label));
  }
  svg.append(el("line", { class: "axis", x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b }));
  svg.append(el("line", { class: "axis", x1: M.l, x2: M.l, y1: M.t, y2: H - M.b }));
  svg.append(el("text", { x: (M.l + W - M.r) / 2, y: H - 4, "text-anchor": "middle" }, xLabel));
  svg.append(el("text", { x: 12, y: (M.t + H - M.b) / 2, "text-anchor": "middle",
                          transform: `rotate(-90 12 ${(M.t + H - M.b) / 2})` }, yLabel));
  return { sx, sy };
}

function empty(svg, text) {
  svg.replaceChildren(el("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" }, text));
}

function drawLoss(svg, rounds) {
  const pts = rounds.filter((r) => r.eval_loss !== undefined);
  if (!pts.length) return empty(svg, "the first evaluation comes before round 1");
  const minutes = pts[pts.length - 1].time_s > 180;
  const xs = pts.map((r) => (minutes ? r.time_s / 60 : r.time_s));
  const ys = pts.map((r) => r.eval_loss);
  const lo = Math.min(...ys), hi = Math.max(...ys), pad = (hi - lo) * 0.1 || 0.5;
  const { sx, sy } = axes(svg, 0, Math.max(...xs, 1), lo - pad, hi + pad,
    { xLabel: minutes ? "time (min)" : "time (s)", yLabel: "eval loss" });
  svg.append(el("polyline", { points: pts.map((r, i) => `${sx(xs[i])},${sy(ys[i])}`).join(" "),
                              fill: "none", stroke: PALETTE[0], "stroke-width": 2 }));
  pts.forEach((r, i) => {
    const c = el("circle", { class: "pt", cx: sx(xs[i]), cy: sy(ys[i]), r: 3.5, fill: PALETTE[0] });
    c.append(el("title", {}, `round ${r.round}: loss ${fmt(r.eval_loss, 4)}, perplexity ${fmt(r.eval_ppl, 4)}`));
    svg.append(c);
  });
  const last = pts[pts.length - 1], first = pts[0];
  const note = pts.length > 1 ? `ppl ${fmt(first.eval_ppl)} \u2192 ${fmt(last.eval_ppl)}` : `ppl ${fmt(last.eval_ppl)}`;
  svg.append(el("text", { x: W - M.r, y: M.t + 10, "text-anchor": "end", class: "note" }, note));
}

function drawCuts(svg, rounds, agents) {
  const played = rounds.filter((r) => r.cuts);
  if (!played.length) return empty(svg, "no round finished yet");
  const names = agents.map((a) => a.name);
  let top = 1;
  for (const r of played) for (const n of names) top = Math.max(top, (r.cuts[n] || 0), (r.tails && r.tails[n]) || 0);
  const x0 = played[0].round, x1 = Math.max(played[played.length - 1].round, x0 + 1);
  const tails = played.some((r) => r.tails && Object.values(r.tails).some((k) => k > 0));  // else: no tail lines
  const { sx, sy } = axes(svg, x0, x1, 0, top + 0.5,
    { xLabel: "round", yLabel: tails ? "cut (solid), tail (dashed)" : "cut layer", xInt: true, yInt: true });
  const kinds = tails ? [["cuts", ""], ["tails", "5 3"]] : [["cuts", ""]];
  names.forEach((n, k) => {
    const jitter = (k - (names.length - 1) / 2) * Math.min(2, 8 / names.length);
    for (const [key, dash] of kinds) {
      const pts = played.filter((r) => r[key] && r[key][n] !== undefined);
      if (!pts.length) continue;
      svg.append(el("polyline", { points: pts.map((r) => `${sx(r.round)},${sy(r[key][n]) + jitter}`).join(" "),
        fill: "none", stroke: colors[n], "stroke-width": 1.8, "stroke-dasharray": dash }));
      for (const r of pts) {
        const c = el("circle", { class: "pt", cx: sx(r.round), cy: sy(r[key][n]) + jitter, r: 2.6, fill: colors[n] });
        c.append(el("title", {}, `${n}, round ${r.round}: ${key === "cuts" ? "cut" : "tail"} ${r[key][n]}`));
        svg.append(c);
      }
    }
  });
}

function drawBytes(svg, rounds) {
  const played = rounds.filter((r) => r.bytes_up !== undefined);
  if (!played.length) return empty(svg, "no round finished yet");
  const top = Math.max(...played.map((r) => Math.max(r.bytes_up, r.bytes_down)), 1) / 1e6;
  const x0 = played[0].round - 0.5, x1 = played[played.length - 1].round + 0.5;
  const { sx, sy } = axes(svg, x0, x1, 0, top * 1.4, { xLabel: "round", yLabel: "MB", xInt: true });  // room for the legend
  const width = Math.max(2, ((W - M.l - M.r) / (x1 - x0)) * 0.35);
  for (const r of played) {
    for (const [key, dx, color] of [["bytes_up", -width, PALETTE[1]], ["bytes_down", 0, PALETTE[2]]]) {
      const y = sy(r[key] / 1e6);
      const bar = el("rect", { class: "bar-" + key, x: sx(r.round) + dx, y, width, height: H - M.b - y, fill: color });
      bar.append(el("title", {}, `round ${r.round}: ${key === "bytes_up" ? "up" : "down"} ${bytes(r[key])}`));
      svg.append(bar);
    }
  }
  svg.append(el("rect", { x: W - M.r - 120, y: M.t, width: 10, height: 10, fill: PALETTE[1] }));
  svg.append(el("text", { x: W - M.r - 106, y: M.t + 9 }, "devices \u2192 host"));
  svg.append(el("rect", { x: W - M.r - 120, y: M.t + 15, width: 10, height: 10, fill: PALETTE[2] }));
  svg.append(el("text", { x: W - M.r - 106, y: M.t + 24 }, "host \u2192 devices"));
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function drawFleet(state) {
  const body = document.querySelector("#fleet tbody");
  const rows = [];
  const longest = Math.max(...state.agents.map((a) => a.step_s || 0), 1e-9);
  for (const a of state.agents) {
    const tr = document.createElement("tr");
    tr.dataset.agent = a.name;
    const name = cell(tr, a.name);
    name.prepend(Object.assign(document.createElement("span"), { className: "dot", style: `background:${colors[a.name]}` }));
    cell(tr, a.class);
    cell(tr, a.online ? "online" : "offline", a.online ? "online" : "offline");
    cell(tr, a.cut === null ? "-" : a.tail !== null && a.tail !== undefined ? `${a.cut} + ${a.tail}` : `${a.cut}`, "num");
    cell(tr, a.step_s === null ? "-" : `${fmt(a.step_s)} s`, "num");
    const bar = document.createElement("div");
    bar.className = "bar";
    const total = Object.values(a.parts).reduce((s, v) => s + v, 0);
    if (total > 0) {
      bar.style.width = `${Math.max(8, (100 * (a.step_s || total)) / longest)}%`;
      for (const part of state.parts) {
        const seconds = a.parts[part] || 0;
        const span = document.createElement("span");
        span.style.width = `${(100 * seconds) / total}%`;
        span.style.background = PART_COLORS[part];
        span.title = `${PART_NAMES[part]}: ${fmt(seconds)} s`;
        span.dataset.part = part;
        bar.append(span);
      }
    }
    const parts = tr.insertCell();
    parts.append(bar);
    if (a.dropped) parts.append(Object.assign(document.createElement("div"), { className: "offline", textContent: `dropped: ${a.dropped}` }));
    const peak = a.peak_rss_mb ?? a.rss_mb;
    const memory = [peak != null ? fmt(peak) : "-", a.memory_mb !== null ? fmt(a.memory_mb) : "-"].join(" / ");
    cell(tr, memory, "num").title = "the most the agent's process has held / what its device can use";
    cell(tr, a.tokens.toLocaleString("en"), "num");
    cell(tr, `${a.rounds}`, "num");
    cell(tr, `${a.rejected}`, "num");
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  const legend = document.getElementById("legend");
  if (!legend.childElementCount) {
    legend.append("step parts:");
    for (const part of state.parts) {
      legend.append(Object.assign(document.createElement("i"), { style: `background:${PART_COLORS[part]}` }), PART_NAMES[part]);
    }
  }
}

function drawController(c) {
  const box = document.getElementById("controller");
  if (!c) { box.textContent = "none yet: the configured cuts run until every device has been measured"; return; }
  const dl = document.createElement("dl");
  const add = (k, v) => dl.append(Object.assign(document.createElement("dt"), { textContent: k }),
                                  Object.assign(document.createElement("dd"), { textContent: v }));
  add("round", `${c.round} (${c.policy})`);
  add("decision", c.reason);
  const turnarounds = Object.entries(c.predicted_device_s || {}).sort((a, b) => b[1] - a[1]);
  const slowest = turnarounds.length ? `, slowest device ${turnarounds[0][0]} ${fmt(turnarounds[0][1])} s` : "";
  add("predicted step", `${fmt(c.predicted_step_s)} s (server ${fmt(c.predicted_server_s)} s${slowest})`);
  add("ideal step", `${fmt(c.ideal_step_s)} s`);
  add("achieved step", `${fmt(c.step_s)} s` + (c.achieved_over_ideal ? ` (${fmt(c.achieved_over_ideal)} x ideal)` : ""));
  box.replaceChildren(dl);
}

function drawRejected(rejected) {
  const box = document.getElementById("rejected");
  const entries = Object.entries(rejected).sort((a, b) => b[1] - a[1]);
  if (!entries.length) { box.textContent = "none"; return; }
  const ul = document.createElement("ul");
  for (const [reason, n] of entries) ul.append(Object.assign(document.createElement("li"), { textContent: `${reason}: ${n}` }));
  box.replaceChildren(ul);
}

function render(state) {
  state.agents.forEach((a, i) => { colors[a.name] = PALETTE[i % PALETTE.length]; });
  const job = state.job;
  document.getElementById("job-name").textContent = job.name;
  const status = document.getElementById("status");
  const where = state.status === "running" ? ` round ${state.round}/${job.rounds}, step ${state.step}/${job.local_steps}` : "";
  status.textContent = `${state.status}${where}`;
  status.className = `status ${state.status}`;
  const online = state.agents.filter((a) => a.online).length;
  document.getElementById("job-facts").textContent =
    `${job.model} | ${job.split === "u" ? "U split" : "two-part split"} | policy ${job.policy} | ` +
    `${online} of ${state.agents.length} devices online (${job.min_agents} needed) | elapsed ${fmt(state.elapsed_s)} s`;
  const banner = document.getElementById("banner");
  banner.hidden = !state.error;
  banner.textContent = state.error ? `the job failed: ${state.error}` : "";
  drawFleet(state);
  drawLoss(document.getElementById("loss-chart"), state.rounds);
  drawCuts(document.getElementById("cut-chart"), state.rounds, state.agents);
  drawBytes(document.getElementById("bytes-chart"), state.rounds);
  drawController(state.controller);
  drawRejected(state.rejected);
  document.body.dataset.version = state.version;
  document.body.dataset.status = state.status;
}

function connect() {
  document.getElementById("metrics-link").href = withToken("metrics");
  const source = new EventSource(withToken("events"));
  source.addEventListener("state", (event) => {
    document.getElementById("banner").hidden = true;
    const started = performance.now();
    render(JSON.parse(event.data));
    const ms = performance.now() - started;  // kept for the benchmarks: what drawing one snapshot costs
    const r = (window.splitftRender ||= { count: 0, totalMs: 0, maxMs: 0, bytes: 0 });
    r.count += 1; r.totalMs += ms; r.maxMs = Math.max(r.maxMs, ms); r.bytes = event.data.length;
  });
  source.onerror = () => {
    const finished = ["done", "failed"].includes(document.body.dataset.status);
    if (finished) { source.close(); return; }  // the coordinator stopped after the job: nothing more will come
    const banner = document.getElementById("banner");
    banner.hidden = false;
    banner.textContent = "lost the connection to the coordinator; retrying...";
  };
}

connect();
