"""The page `cf serve` shows: the video as it streams, the memory's slot table per chunk, and the controls.

It reads ``/api/state`` once and then the server-sent events of ``/api/events``; ``window.cfLive`` holds what it
received (chunks with their prompt, switch flag, slot table and frames), for the browser test and the curious.
"""

PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Context Forcing · live</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f5f6f8; color: #222; }
  header { background: #1f2933; color: #fff; padding: 10px 18px; display: flex; gap: 16px; align-items: baseline; }
  header h1 { font-size: 18px; margin: 0; }
  header span { color: #aab4be; font-size: 12px; }
  main { display: flex; gap: 18px; padding: 16px 18px; align-items: flex-start; flex-wrap: wrap; }
  section { background: #fff; border-radius: 8px; padding: 14px; box-shadow: 0 1px 3px rgba(0,0,0,.12); }
  #left { width: 400px; }
  #right { flex: 1; min-width: 520px; }
  #screen { width: 384px; height: 384px; background: #111; display: flex; align-items: center; justify-content: center; }
  #frame { max-width: 384px; max-height: 384px; width: 384px; image-rendering: pixelated; }
  #status { margin-top: 8px; font-weight: 600; }
  #playing { color: #555; font-size: 12px; min-height: 1.4em; }
  input, select, textarea, button { font: inherit; }
  textarea { width: 100%; box-sizing: border-box; }
  #next-prompt { width: 100%; box-sizing: border-box; margin-top: 10px; }
  .row { display: flex; gap: 10px; flex-wrap: wrap; margin: 8px 0; align-items: center; }
  .row label { display: flex; flex-direction: column; font-size: 12px; color: #555; }
  input[type=number] { width: 80px; }
  button { padding: 5px 14px; border-radius: 5px; border: 1px solid #888; background: #fff; cursor: pointer; }
  button.primary { background: #2563eb; border-color: #2563eb; color: #fff; }
  button:disabled { opacity: .45; cursor: default; }
  #switch-note { font-size: 12px; color: #555; min-height: 1.4em; }
  #switch-log { font-size: 12px; padding-left: 20px; margin: 4px 0; }
  #error { color: #b91c1c; font-size: 12px; min-height: 1.2em; }
  h2 { font-size: 15px; margin: 14px 0 6px; }
  .legend span { display: inline-block; padding: 1px 8px; border-radius: 3px; margin-right: 6px; font-size: 12px; }
  #slots { border-collapse: collapse; font: 11px/1.2 ui-monospace, monospace; }
  #slots th { font-weight: 600; padding: 2px 4px; color: #fff; }
  #slots td { width: 24px; height: 18px; text-align: center; border: 1px solid #fff; }
  #slots td.chunk { width: auto; padding: 0 6px; color: #333; background: #eef0f3; text-align: right; }
  #slots td.switched { background: #fde68a; }
  .sink { background: #7c3aed; color: #fff; } .slow { background: #059669; color: #fff; }
  .fast { background: #2563eb; color: #fff; } .empty { background: #e5e7eb; color: #999; }
  #slots td.new { font-weight: 700; outline: 2px solid #f59e0b; outline-offset: -2px; }
  #agree { font-size: 12px; color: #555; }
</style>
</head>
<body>
<header><h1>Context Forcing · live generation</h1><span id="model"></span></header>
<main>
<section id="left">
  <div id="screen"><img id="frame" alt=""></div>
  <div id="status">idle</div>
  <div id="playing"></div>
  <input id="next-prompt" placeholder="new prompt: takes effect at the next chunk">
  <div class="row"><button id="switch" disabled>Switch prompt</button><span id="switch-note"></span></div>
  <div>Prompt switches (chunk: prompt)</div>
  <ol id="switch-log"></ol>
</section>
<section id="right">
  <div><b>New video</b></div>
  <textarea id="prompt" rows="2"></textarea>
  <div class="row">
    <label>memory <select id="memory"></select></label>
    <label>re-cache at a switch <select id="recache"></select></label>
    <label>seed <input id="seed" type="number" step="1"></label>
    <label>seconds <input id="seconds" type="number" min="1" step="1"></label>
    <label>speed (0: max) <input id="speed" type="number" min="0" step="0.5"></label>
    <button id="start" class="primary">Start</button><button id="stop" disabled>Stop</button>
  </div>
  <div id="error"></div>
  <h2>Memory slot table <span id="agree"></span></h2>
  <div class="legend"><span class="sink">sink</span><span class="slow">slow</span><span class="fast">fast</span>
    <span class="empty">empty</span> each cell: the source latent frame the slot holds (outlined: new this chunk);
    one row per chunk, newest first</div>
  <table id="slots"><thead></thead><tbody></tbody></table>
</section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const KEEP_FRAMES_OF = 64, TABLE_ROWS = 14, BACKLOG_CHUNKS = 3;
const live = window.cfLive = { session: null, settings: null, info: null, status: "idle", chunks: [], switches: [],
                               done: null, framesReceived: 0, framesShown: 0, queue: [], queued: null };
let timer = null;

async function post(path, body) {
  const response = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" },
                                       body: JSON.stringify(body || {}) });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function options(select, values, chosen) {
  select.innerHTML = "";
  for (const value of values) select.add(new Option(value, value, false, value === chosen));
}

function setStatus(text) { live.status = text; $("status").textContent = text; }

function play() {
  if (timer) clearInterval(timer);
  const speed = live.settings && live.settings.speed > 0 ? live.settings.speed : 1;
  timer = setInterval(() => {
    const backlog = BACKLOG_CHUNKS * 4 * live.info.frames_per_chunk;
    if (live.queue.length > backlog) live.queue.splice(0, live.queue.length - backlog);
    const frame = live.queue.shift();
    if (!frame) return;
    $("frame").src = frame.src;
    live.framesShown += 1;
    $("playing").textContent = `chunk ${frame.chunk} · ${frame.prompt}`;
  }, 1000 / (live.info.fps * speed));
}

function onStart(event) {
  Object.assign(live, { session: event.session, settings: event.settings, info: event, chunks: [], switches: [],
                        done: null, framesReceived: 0, framesShown: 0, queue: [], queued: null });
  const settings = event.settings;
  for (const name of ["prompt", "memory", "recache", "seed", "seconds", "speed"]) $(name).value = settings[name];
  setStatus(`running: ${event.chunks} chunks, memory ${event.settings.memory}, re-cache ${event.settings.recache}`);
  $("switch-log").innerHTML = "";
  $("switch-note").textContent = "";
  $("slots").tBodies[0].innerHTML = "";
  $("switch").disabled = $("stop").disabled = false;
  play();
}

function regionHeader(slots) {
  const row = document.createElement("tr");
  row.appendChild(document.createElement("th"));
  let run = null;
  for (const slot of slots) {
    if (run && run.dataset.region === slot.region) { run.colSpan += 1; continue; }
    run = document.createElement("th");
    run.dataset.region = slot.region;
    run.className = slot.region;
    run.textContent = slot.region;
    row.appendChild(run);
  }
  const head = $("slots").tHead;
  head.innerHTML = "";
  head.appendChild(row);
}

function addSlotRow(chunk, previous) {
  regionHeader(chunk.slots);
  const row = document.createElement("tr");
  const label = row.insertCell();
  label.className = "chunk" + (chunk.switched ? " switched" : "");
  label.textContent = `#${chunk.index}` + (chunk.switched ? " ⇄" : "");
  label.title = chunk.prompt;
  chunk.slots.forEach((slot, i) => {
    const cell = row.insertCell();
    const before = previous && previous.slots[i] ? previous.slots[i].frame : -1;
    cell.className = "slot " + slot.region + (slot.frame >= 0 && slot.frame !== before ? " new" : "");
    cell.dataset.region = slot.region;
    cell.textContent = slot.frame >= 0 ? String(slot.frame) : "";
  });
  const body = $("slots").tBodies[0];
  body.insertBefore(row, body.firstChild);
  while (body.rows.length > TABLE_ROWS) body.deleteRow(body.rows.length - 1);
  $("agree").textContent = chunk.layers_agree ? "(all layers agree)"
    : "(layers differ: the frame most layers hold)";
}

function onChunk(event) {
  if (event.session !== live.session) return;
  const previous = live.chunks[live.chunks.length - 1];
  live.chunks.push(event);
  if (live.chunks.length > KEEP_FRAMES_OF) live.chunks[live.chunks.length - 1 - KEEP_FRAMES_OF].frames = null;
  live.framesReceived += event.frames.length;
  for (const src of event.frames) live.queue.push({ src, chunk: event.index, prompt: event.prompt });
  if (event.switched) {
    live.switches.push({ chunk: event.index, prompt: event.prompt });
    const item = document.createElement("li");
    item.textContent = `${event.index}: ${event.prompt}`;
    $("switch-log").appendChild(item);
    if (live.queued && live.queued.prompt === event.prompt) $("switch-note").textContent = `switched at chunk ${event.index}`;
  }
  addSlotRow(event, previous);
  setStatus(`running: chunk ${event.index + 1} of ${live.info.chunks} (${event.seconds.toFixed(1)} s)`);
}

function onDone(event) {
  if (event.session !== live.session) return;
  live.done = event;
  setStatus(`${event.status}: ${event.chunks} chunks` + (event.message ? ` (${event.message})` : ""));
  $("switch").disabled = $("stop").disabled = true;
}

async function start() {
  $("error").textContent = "";
  try {
    await post("/api/start", { prompt: $("prompt").value, memory: $("memory").value, recache: $("recache").value,
                               seed: parseInt($("seed").value, 10), seconds: parseFloat($("seconds").value),
                               speed: parseFloat($("speed").value) });
  } catch (error) { $("error").textContent = error.message; }
}

async function switchPrompt() {
  $("error").textContent = "";
  const prompt = $("next-prompt").value;
  try {
    const answer = await post("/api/prompt", { prompt });
    live.queued = answer;
    $("switch-note").textContent = `queued for chunk ${answer.chunk}`;
  } catch (error) { $("error").textContent = error.message; }
}

async function init() {
  const state = await (await fetch("/api/state")).json();
  const defaults = state.defaults;
  options($("memory"), state.memory_choices, defaults.memory);
  options($("recache"), state.recache_choices, defaults.recache);
  $("prompt").value = defaults.prompt;
  $("seed").value = defaults.seed;
  $("seconds").value = defaults.seconds;
  $("seconds").max = state.max_seconds;
  $("speed").value = defaults.speed;
  $("model").textContent = `${state.description} · ${state.frame_size[1]}×${state.frame_size[0]} at ${state.fps} fps,`
    + ` ${state.frames_per_chunk} latent frames per chunk`;
  $("start").onclick = start;
  $("stop").onclick = () => post("/api/stop").catch((error) => { $("error").textContent = error.message; });
  $("switch").onclick = switchPrompt;
  $("next-prompt").addEventListener("keydown", (e) => { if (e.key === "Enter") switchPrompt(); });
  const events = new EventSource("/api/events");
  events.addEventListener("start", (e) => onStart(JSON.parse(e.data)));
  events.addEventListener("chunk", (e) => onChunk(JSON.parse(e.data)));
  events.addEventListener("done", (e) => onDone(JSON.parse(e.data)));
  live.ready = true;
}
init();
</script>
</body>
</html>
"""
