// pipetrain what-if page: reads the knobs from the controls, asks the server to evaluate them
// (POST /api/simulate), shows the result. No framework and no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
let base = null;        // the plan as the server describes it (/api/state)
let seq = 0;            // the latest request's number: a slower, older answer must not overwrite a newer one
let timer = null;
let lastNeed = [];

// 4 significant digits, trailing zeros after the point dropped ("2650", "4.5", never "265" for 2650)
function sig4(x) { const t = x >= 1000 ? x.toFixed(0) : x.toPrecision(4); return t.includes(".") ? t.replace(/0+$/, "").replace(/\.$/, "") : t; }
function fmtMs(s) { return s >= 10 ? sig4(s) + " s" : sig4(s * 1e3) + " ms"; }  // as format_step_time (pipetrain/ui/whatif.py)
function fmtBytes(b) {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(b) >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return (b >= 100 ? b.toFixed(0) : b.toPrecision(3)) + " " + u[i];
}
function pct(x) { return (x * 100).toFixed(1) + " %"; }
function cell(tr, text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; tr.appendChild(td); return td; }
function showError(msg) { const e = $("error"); e.textContent = msg || ""; e.hidden = !msg; }

function numberInput(id, value, min) {
  const inp = document.createElement("input");
  inp.type = "number"; inp.id = id; inp.min = String(min); inp.step = "1"; inp.value = String(value);
  inp.addEventListener("input", () => schedule(150));
  return inp;
}
function pmButton(id, label, target, delta) {
  const b = document.createElement("button");
  b.type = "button"; b.id = id; b.className = "pm"; b.textContent = label;
  b.addEventListener("click", () => { const inp = $(target); inp.value = String((parseInt(inp.value, 10) || 0) + delta); schedule(0); });
  return b;
}

function buildTable() {
  const body = $("stages-body");
  body.textContent = "";
  base.stages.forEach((st, s) => {
    const tr = document.createElement("tr");
    tr.id = "stage-row-" + s;
    cell(tr, String(s));
    cell(tr, String(st.rank));
    const bd = cell(tr, s === 0 ? "0" : "", "boundary");
    if (s > 0) {
      bd.textContent = "";
      bd.appendChild(pmButton("boundary-" + s + "-minus", "-", "boundary-" + s, -1));
      bd.appendChild(numberInput("boundary-" + s, base.knobs.boundaries[s - 1], 1));
      bd.appendChild(pmButton("boundary-" + s + "-plus", "+", "boundary-" + s, 1));
    }
    cell(tr, "").id = "blocks-" + s;
    const bu = cell(tr, "");
    bu.appendChild(numberInput("buffers-" + s, base.knobs.buffers[s], 1));
    cell(tr, "").id = "need-" + s;
    const rc = cell(tr, "");
    const cb = document.createElement("input");
    cb.type = "checkbox"; cb.id = "recompute-" + s; cb.checked = base.knobs.recompute[s];
    cb.addEventListener("change", () => schedule(0));
    rc.appendChild(cb);
    cell(tr, "").id = "busy-" + s;
    cell(tr, "").id = "sbubble-" + s;
    cell(tr, "").id = "mem-" + s;
    body.appendChild(tr);
  });
}

// ----- the block strip: one cell per block, coloured by stage, a draggable handle per boundary -----
const STAGE_COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"];

function buildStrip() {
  const strip = $("blockstrip");
  strip.textContent = "";
  const n = base.num_blocks;
  for (let i = 0; i < n; i++) {
    const c = document.createElement("div");
    c.className = "blk"; c.id = "blk-" + i; c.title = "block " + i + (base.block_names ? " (" + base.block_names[i] + ")" : "");
    c.style.left = (100 * i / n) + "%"; c.style.width = (100 / n) + "%";
    strip.appendChild(c);
  }
  for (let s = 1; s < base.stages.length; s++) {
    const h = document.createElement("div");
    h.className = "handle"; h.id = "handle-" + s; h.title = "boundary of stage " + s;
    h.addEventListener("pointerdown", (ev) => startDrag(ev, s));
    strip.appendChild(h);
  }
}

// the boundaries as the inputs hold them, or null while one is not a whole number
function currentBounds() {
  const out = [0];
  for (let s = 1; s < base.stages.length; s++) {
    const v = $("boundary-" + s).value.trim();
    if (!/^-?\d+$/.test(v)) return null;
    out.push(parseInt(v, 10));
  }
  out.push(base.num_blocks);
  return out;
}

function drawStrip() {
  const b = currentBounds();
  if (!b) return;
  const n = base.num_blocks;
  let s = 0;
  for (let i = 0; i < n; i++) {
    while (s + 1 < b.length - 1 && i >= b[s + 1]) s++;
    $("blk-" + i).style.background = STAGE_COLORS[s % STAGE_COLORS.length];
    $("blk-" + i).dataset.stage = String(s);
  }
  for (let k = 1; k < b.length - 1; k++) $("handle-" + k).style.left = (100 * Math.min(Math.max(b[k], 0), n) / n) + "%";
}

// drag: the handle snaps to the nearest block edge, kept between its neighbours (no stage empties)
function startDrag(ev, s) {
  ev.preventDefault();
  const h = $("handle-" + s);
  h.classList.add("dragging");
  const rect = $("blockstrip").getBoundingClientRect();
  const n = base.num_blocks;
  const b = currentBounds() || [0, ...base.knobs.boundaries, n];
  const lo = b[s - 1] + 1, hi = b[s + 1] - 1;
  const move = (e) => {
    const v = Math.max(lo, Math.min(hi, Math.round((e.clientX - rect.left) / rect.width * n)));
    if (String(v) !== $("boundary-" + s).value) { $("boundary-" + s).value = String(v); schedule(120); }
  };
  const up = () => {
    window.removeEventListener("pointermove", move);
    window.removeEventListener("pointerup", up);
    h.classList.remove("dragging");
    schedule(0);
  };
  window.addEventListener("pointermove", move);
  window.addEventListener("pointerup", up);
}

function setKnobs(k) {
  $("microbatches").value = String(k.num_microbatches);
  $("schedule").value = k.schedule;
  k.boundaries.forEach((b, i) => { $("boundary-" + (i + 1)).value = String(b); });
  k.buffers.forEach((b, s) => { $("buffers-" + s).value = String(b); });
  k.recompute.forEach((r, s) => { $("recompute-" + s).checked = r; });
}

function readInt(id, what) {
  const v = $(id).value.trim();
  if (!/^-?\d+$/.test(v)) throw new Error(what + ": enter a whole number");
  return parseInt(v, 10);
}

function readKnobs() {
  const n = base.stages.length;
  const k = { num_microbatches: readInt("microbatches", "micro-batches"), schedule: $("schedule").value, boundaries: [], buffers: [], recompute: [] };
  for (let s = 1; s < n; s++) k.boundaries.push(readInt("boundary-" + s, "boundary of stage " + s));
  for (let s = 0; s < n; s++) { k.buffers.push(readInt("buffers-" + s, "buffers of stage " + s)); k.recompute.push($("recompute-" + s).checked); }
  return k;
}

function schedule(delay) {
  drawStrip();
  clearTimeout(timer);
  timer = setTimeout(evaluate, delay);
}

async function post(url, body) {
  const r = await fetch(url, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
  return data;
}

async function evaluate() {
  let knobs;
  try { knobs = readKnobs(); } catch (e) { showError(e.message); return; }
  const mine = ++seq;
  const t0 = performance.now();
  try {
    const ev = await post("/api/simulate", { knobs: knobs });
    if (mine !== seq) return;
    show(ev, t0);
  } catch (e) {
    if (mine !== seq) return;
    showError(e.message);
    $("result-panel").classList.add("stale");
  }
}

// t0: when the edit's request started; the update time shown runs from there to the DOM updated
function show(ev, t0) {
  showError(ev.error);
  $("result-panel").classList.remove("stale");
  const m = ev.metrics;
  document.body.dataset.ok = ev.ok ? "1" : "0";
  if (m) {
    $("step-time").textContent = m.step_time_text;
    $("bubble").textContent = pct(m.bubble_fraction);
    $("samples").textContent = m.samples_per_s.toPrecision(4);
    $("mfu").textContent = m.mfu === null ? "-" : pct(m.mfu);
    $("evaluator").textContent = m.evaluator + " (" + m.num_compute_actions + " actions)";
    $("timeline").innerHTML = ev.svg;  // built by the server (pipetrain/ui/svg.py): markup only, labels escaped
  } else {
    // no simulation for this edit: the last one stays, dimmed, under the reason
    ["timeline", "step-time", "bubble", "samples", "mfu"].forEach((id) => $(id).classList.add("stale"));
  }
  if (m) ["timeline", "step-time", "bubble", "samples", "mfu"].forEach((id) => $(id).classList.remove("stale"));
  if (ev.need_buffers.length) lastNeed = ev.need_buffers;
  base.stages.forEach((_, s) => {
    const row = $("stage-row-" + s);
    if (ev.stages) { const st = ev.stages[s]; $("blocks-" + s).textContent = st.block_start + ".." + (st.block_end - 1) + " (" + (st.block_end - st.block_start) + ")"; }
    $("need-" + s).textContent = lastNeed.length ? String(lastNeed[s]) : "-";
    $("busy-" + s).textContent = m ? fmtMs(m.busy_s_per_stage[s]) : "-";
    $("sbubble-" + s).textContent = m ? pct(m.bubble_fraction_per_stage[s]) : "-";
    const memCell = $("mem-" + s);
    memCell.textContent = "";
    if (ev.memory_bytes.length) {
      const used = ev.memory_bytes[s], cap = ev.caps_bytes[s];
      const bar = document.createElement("span"); bar.className = "membar";
      const fill = document.createElement("span"); fill.style.width = Math.min(100, 100 * used / cap).toFixed(1) + "%";
      if (used > cap) fill.className = "over";
      bar.appendChild(fill); memCell.appendChild(bar);
      memCell.appendChild(document.createTextNode(fmtBytes(used) + " / " + fmtBytes(cap)));
      row.classList.toggle("bad", used > cap);
    }
  });
  void document.body.offsetHeight;  // lay the page out now, so the time shown includes it
  $("elapsed").textContent = (t0 !== undefined ? (performance.now() - t0).toFixed(0) + " ms (server " : "(server ") + (ev.elapsed_s * 1e3).toFixed(0) + " ms)";
}

function showRun(run) {
  $("run-panel").hidden = false;
  let text = run.run_dir + ": " + run.steps + " steps (" + run.backend + "), median measured step " + fmtMs(run.median_step_time_s);
  if (run.fidelity) text += "; simulated as executed " + fmtMs(run.fidelity.sim_step_s) + " (error " + pct(run.fidelity.step_error) + ", " + run.fidelity.cost_source + ")";
  if (run.validation) text += "; validation " + (run.validation.passed ? "PASSED" : "FAILED") + ", max loss rel. diff " + run.validation.max_loss_rel_diff.toExponential(2);
  $("run-summary").textContent = text;
  $("loss-chart").innerHTML = run.loss_svg;  // server-built SVG
  $("validation-note").textContent = run.validation_note || "";
  $("fidelity-note").textContent = run.fidelity_note || "";
  const body = $("fidelity-body");
  run.fidelity_stages.forEach((s) => {
    const tr = document.createElement("tr");
    cell(tr, String(s.stage)); cell(tr, String(s.rank));
    cell(tr, fmtMs(s.sim_busy_s)); cell(tr, fmtMs(s.meas_busy_s)); cell(tr, pct(s.busy_error));
    cell(tr, pct(s.sim_bubble)); cell(tr, pct(s.meas_bubble));
    cell(tr, fmtBytes(s.sim_activation_bytes)); cell(tr, fmtBytes(s.meas_activation_bytes)); cell(tr, pct(s.activation_error));
    body.appendChild(tr);
  });
}

async function save() {
  let knobs;
  try { knobs = readKnobs(); } catch (e) { $("save-status").textContent = e.message; return; }
  $("save-status").textContent = "saving...";
  try {
    const r = await post("/api/save", { knobs: knobs, name: $("save-name").value });
    $("save-status").textContent = "saved " + r.path;
    $("save-status").dataset.path = r.path;
  } catch (e) {
    $("save-status").textContent = e.message;
    $("save-status").dataset.path = "";
  }
}

async function init() {
  const r = await fetch("/api/state");
  const state = await r.json();
  base = state.plan;
  const p = base;
  $("plan-summary").textContent = (state.source ? state.source + ": " : "") + p.model + " on " + p.topology + ", pp=" + p.pp + " dp=" + p.dp +
    (p.chunks > 1 ? " chunks=" + p.chunks : "") + ", micro-batch " + p.micro_batch_size + " x seq " + p.seq_len + ", " + p.dtype + ", " +
    p.num_blocks + " blocks" + (p.simulation_only ? " (simulation only)" : "") + "; plans are saved into " + state.save_dir;
  const sel = $("schedule");
  p.schedules.forEach((s) => { const o = document.createElement("option"); o.value = s; o.textContent = s; sel.appendChild(o); });
  buildTable();
  buildStrip();
  setKnobs(p.knobs);
  drawStrip();
  $("microbatches").addEventListener("input", () => schedule(150));
  $("microbatches-minus").addEventListener("click", () => { $("microbatches").value = String(Math.max(1, readInt("microbatches", "") - 1)); schedule(0); });
  $("microbatches-plus").addEventListener("click", () => { $("microbatches").value = String(readInt("microbatches", "") + 1); schedule(0); });
  sel.addEventListener("change", () => schedule(0));
  $("buffers-auto").addEventListener("click", async () => {
    // ask with ample buffers, then set each stage's to what the schedule keeps in flight
    let k; try { k = readKnobs(); } catch (e) { showError(e.message); return; }
    k.buffers = k.buffers.map(() => k.num_microbatches * Math.max(1, p.chunks));
    try {
      const ev = await post("/api/simulate", { knobs: k });
      if (ev.need_buffers.length) ev.need_buffers.forEach((n, s) => { $("buffers-" + s).value = String(Math.max(1, n)); });
    } catch (e) { showError(e.message); return; }
    schedule(0);
  });
  $("reset").addEventListener("click", () => { setKnobs(p.knobs); schedule(0); });
  $("save").addEventListener("click", save);
  show(state.evaluation);
  if (state.run) showRun(state.run);
  document.body.dataset.ready = "1";
}

init().catch((e) => showError("could not load the plan: " + e.message));
