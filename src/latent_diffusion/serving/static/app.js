// The page speaks the server's own API: GET /api/v1/models, POST /api/v1/generate, and while that runs,
// GET /api/v1/progress?task_id=... for the progress bar and the preview of the step's prediction.
"use strict";

const $ = (id) => document.getElementById(id);
const POLL_MS = 250;
let running = null; // the task id of the job this page waits for

function headers() {
  const token = $("token").value || localStorage.getItem("ldm-token") || "";
  const h = { "Content-Type": "application/json" };
  if (token) h.Authorization = `Bearer ${token}`;
  return h;
}

async function call(path, options = {}) {
  const reply = await fetch(path, { ...options, headers: headers() });
  const data = await reply.json().catch(() => ({}));
  if (!reply.ok) {
    if (reply.status === 401) $("access").open = true;
    const detail = Array.isArray(data.detail)
      ? data.detail.map((d) => `${d.loc.slice(1).join(".")}: ${d.msg}`).join("; ")
      : data.detail || reply.statusText;
    throw new Error(`${reply.status}: ${detail}`);
  }
  return data;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function loadModels() {
  try {
    const info = await call("/api/v1/models");
    $("model").replaceChildren(...info.models.map((name) => new Option(name, name, false, name === info.current)));
    $("sampler").append(...info.samplers.map((name) => new Option(name, name)));
  } catch (error) {
    status(`could not list the models (${error.message})`, true);
  }
}

function number(id, parse = Number) {
  const value = $(id).value.trim();
  return value === "" ? null : parse(value);
}

function request() {
  return {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value || null,
    model: $("model").value || null,
    sampler: $("sampler").value || null,
    steps: number("steps", parseInt),
    guidance: number("guidance"),
    seed: number("seed", parseInt),
    width: number("width", parseInt),
    height: number("height", parseInt),
    num_images: number("count", parseInt) || 1,
    task_id: running,
  };
}

async function poll(task) {
  const bar = $("progress");
  while (running === task) {
    try {
      const p = await call(`/api/v1/progress?task_id=${encodeURIComponent(task)}`);
      if (running !== task) break;
      if (p.state === "queued") status(`waiting: ${p.queue_position} ahead`);
      if (p.state === "running") {
        bar.value = p.fraction;
        if (p.fraction > 0 && p.fraction < 1) bar.dataset.moves = String(Number(bar.dataset.moves || 0) + 1);
        status(`step ${p.step} of ${p.steps}` + (p.eta > 0 ? `, about ${p.eta.toFixed(1)} s left` : ""));
        if (p.preview) {
          $("preview").src = `data:image/png;base64,${p.preview}`;
          $("preview").hidden = false;
        }
      }
    } catch (error) {
      status(error.message, true);
    }
    await new Promise((done) => setTimeout(done, POLL_MS));
  }
}

function show(result) {
  for (const image of [...result.images].reverse()) {
    const figure = document.createElement("figure");
    const img = new Image();
    img.src = `data:image/png;base64,${image.png}`;
    img.alt = result.images.length > 1 ? `seed ${image.seed}` : "generated image";
    const caption = document.createElement("figcaption");
    caption.textContent = image.parameters;
    const download = document.createElement("a");
    download.href = img.src;
    download.download = `${image.seed}.png`;
    download.textContent = "download";
    figure.append(img, caption, download);
    $("gallery").prepend(figure);
  }
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  const token = $("token").value;
  if (token) localStorage.setItem("ldm-token", token);
  running = crypto.randomUUID ? crypto.randomUUID() : `t${Date.now()}${Math.random().toString(16).slice(2)}`;
  const task = running;
  $("generate").disabled = true;
  $("stop").disabled = false;
  $("progress").value = 0;
  $("progress").dataset.moves = "0";
  status("queued");
  const polling = poll(task);
  try {
    const started = performance.now();
    const result = await call("/api/v1/generate", { method: "POST", body: JSON.stringify(request()) });
    $("progress").value = 1;
    show(result);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    status(`${result.images.length} image${result.images.length > 1 ? "s" : ""} in ${seconds} s ` +
           `(${result.model}, ${result.sampler}, ${result.steps} steps, ${result.width}×${result.height})`);
  } catch (error) {
    status(error.message, true);
  } finally {
    running = null;
    await polling;
    $("generate").disabled = false;
    $("stop").disabled = true;
  }
}

async function stop() {
  if (!running) return;
  try {
    await call(`/api/v1/interrupt?task_id=${encodeURIComponent(running)}`, { method: "POST" });
    status("stopping at the next step");
  } catch (error) {
    status(error.message, true);
  }
}

$("form").addEventListener("submit", generate);
$("stop").addEventListener("click", stop);
$("token").value = localStorage.getItem("ldm-token") || "";
$("token").addEventListener("change", loadModels);
loadModels();
