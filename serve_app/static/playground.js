"use strict";
// The playground talks to the public API only, with the key kept in this tab's sessionStorage.
// Every path is relative: the page's <base> is the app's route prefix.

const KEY_NAME = "wan-i2v-api-key";
const POLL_MS = 500;
const FINAL = ["succeeded", "failed", "canceled"];
const $ = (id) => document.getElementById(id);

const state = {
  model: null,      // /v1/models' first model: defaults, samplers, max_loras, speed_modes
  image: null,      // Promise of the chosen file as a data: URI (read while the user types on)
  watch: null,      // the request id whose status is followed; a new job or a click replaces it
  mediaUrl: null,   // blob: URL of the shown output (revoked when replaced)
  nextBefore: null, // cursor of the next page of recent jobs
};

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_NAME);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// fetch with the key; any non-2xx becomes an ApiError carrying the API's stable error code.
async function api(path, { method = "GET", body, headers: extra } = {}) {
  const headers = { ...authHeaders(), ...extra };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!r.ok) {
    let error = null;
    try { error = (await r.json()).detail.error; } catch (_) { /* not the API's error shape */ }
    throw new ApiError(r.status, error?.code ?? `HTTP_${r.status}`, error?.message ?? r.statusText);
  }
  return r;
}

const describe = (e) => (e instanceof ApiError ? `${e.code}: ${e.message}` : e.message || String(e));
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const jobPath = (id, tail) => `v1/requests/${encodeURIComponent(id)}/${tail}`;

// -- model and key ----------------------------------------------------------------------------

async function loadModel() {
  try {
    const { models } = await (await api("v1/models")).json();
    state.model = models[0];
    applyModel(state.model);
    $("key-status").textContent = sessionStorage.getItem(KEY_NAME) ? "key accepted" : "";
  } catch (e) {
    state.model = null;
    $("key-status").textContent = e.status === 401 ? "this server needs an API key" : describe(e);
  }
  $("submit").disabled = state.model === null;
}

function applyModel(m) {
  const defaults = {
    width: m.default_width, height: m.default_height, "num-frames": m.default_num_frames, fps: m.default_fps,
    steps: m.default_steps, guidance: m.default_guidance_scale,
  };
  for (const [id, value] of Object.entries(defaults)) $(id).placeholder = String(value);
  const sampler = $("sampler");
  sampler.replaceChildren(new Option("(default)", ""), ...m.samplers.map((s) => new Option(s, s)));
  // Speed modes exist only on servers that offer them: no field otherwise.
  const modes = Array.isArray(m.speed_modes) ? m.speed_modes : [];
  $("speed").replaceChildren(...modes.map((s) => new Option(s, s)));
  if (modes.includes(m.default_speed)) $("speed").value = m.default_speed;
  $("speed-label").hidden = modes.length === 0;
  updateLoras();
}

async function useKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
  await Promise.all([loadModel(), refreshRecent()]);
}

// -- first frame ------------------------------------------------------------------------------

function setImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    $("form-error").textContent = "the first frame must be an image file";
    return;
  }
  $("image-url").value = "";
  state.image = new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  state.image.then((uri) => {
    $("image-preview").src = uri;
    $("image-preview").hidden = false;
  });
}

function clearImage() {
  state.image = null;
  $("image-file").value = "";
  $("image-preview").hidden = true;
  $("image-preview").removeAttribute("src");
}

// -- LoRAs --------------------------------------------------------------------------------------

const maxLoras = () => state.model?.max_loras ?? 0;
const loraRows = () => [...document.querySelectorAll("#loras .lora")];

function addLora() {
  if (loraRows().length >= maxLoras()) return;
  const row = document.createElement("div");
  row.className = "lora";
  const path = Object.assign(document.createElement("input"), {
    type: "text", className: "lora-path", placeholder: "job/job.safetensors, https://... or hf://owner/repo/file",
  });
  const scale = Object.assign(document.createElement("input"), {
    type: "number", className: "lora-scale", min: "-2", max: "2", step: "0.05", value: "1", title: "scale",
  });
  const remove = Object.assign(document.createElement("button"), { type: "button", textContent: "Remove" });
  remove.addEventListener("click", () => { row.remove(); updateLoras(); });
  row.append(path, scale, remove);
  $("loras").append(row);
  updateLoras();
}

function updateLoras() {
  const n = loraRows().length;
  $("lora-add").disabled = n >= maxLoras();
  $("lora-count").textContent = `(${n} of up to ${maxLoras()})`;
}

// -- submit -------------------------------------------------------------------------------------

const NUMBERS = [
  ["width", "width"], ["height", "height"], ["num_frames", "num-frames"], ["fps", "fps"],
  ["sample_steps", "steps"], ["guidance_scale", "guidance"], ["seed", "seed"],
];

async function buildRequest() {
  const ctrl = state.image ? await state.image : $("image-url").value.trim();
  if (!ctrl) throw new Error("a first frame is required: upload or paste an image, or give its URL");
  const prompt = { prompt: $("prompt").value, neg: $("neg").value, ctrl_img: ctrl };
  for (const [field, id] of NUMBERS) {
    const text = $(id).value.trim(); // "" also for text a number field cannot parse
    if (text !== "") prompt[field] = Number(text);
  }
  if ($("sampler").value) prompt.sampler = $("sampler").value;
  const request = {
    model: state.model.id,
    prompts: [prompt],
    loras: loraRows()
      .map((row) => ({
        path: row.querySelector(".lora-path").value.trim(),
        network_multiplier: Number(row.querySelector(".lora-scale").value || 1),
      }))
      .filter((lora) => lora.path !== ""),
  };
  if ($("trigger-word").value.trim()) request.trigger_word = $("trigger-word").value.trim();
  if (!$("speed-label").hidden && $("speed").value) request.speed = $("speed").value;
  return request;
}

async function submit(event) {
  event.preventDefault();
  $("form-error").textContent = "";
  $("submit").disabled = true;
  try {
    const request = await buildRequest();
    const queued = await (await api("v1/inference", { method: "POST", body: request })).json();
    refreshRecent();
    watch(queued.request_id); // reports its own errors; the form is free for the next job meanwhile
  } catch (e) {
    $("form-error").textContent = describe(e);
  } finally {
    $("submit").disabled = state.model === null;
  }
}

// -- one job ------------------------------------------------------------------------------------

function showJob(id) {
  state.watch = id;
  $("job").hidden = false;
  $("job-id").textContent = id;
  for (const el of ["job-status", "job-stage", "job-step", "job-error", "video-info"]) $(el).textContent = "";
  $("job-progress").value = 0;
  for (const el of ["video", "animation", "download"]) $(el).hidden = true;
  $("video").removeAttribute("src");
  $("animation").removeAttribute("src");
  if (state.mediaUrl) URL.revokeObjectURL(state.mediaUrl);
  state.mediaUrl = null;
}

function renderStatus(s) {
  const p = s.progress;
  $("job-status").textContent = s.status;
  $("job-stage").textContent = p.num_prompts > 1 ? `${p.stage} (prompt ${p.prompt_index + 1} of ${p.num_prompts})`
                                                 : p.stage;
  $("job-step").textContent = p.total_steps ? `step ${p.step}/${p.total_steps}` : "";
  $("job-progress").value = s.status === "succeeded" ? 1 : (p.total_steps ? p.step / p.total_steps : 0);
  $("job-error").textContent = s.error ? `${s.error.code}: ${s.error.message}` : "";
  $("cancel").hidden = FINAL.includes(s.status);
}

// Show one status of the watched job; true once it is final (its first output shown if it succeeded).
async function show(id, status) {
  if (state.watch !== id) return true;
  renderStatus(status);
  if (!FINAL.includes(status.status)) return false;
  if (status.status === "succeeded") await showOutput(id);
  refreshRecent();
  return true;
}

// Follow the job's event stream until it is final (or another job is shown): every stage and step as
// it happens. fetch, not EventSource, which cannot send the key; a connection that ends early is
// resumed with Last-Event-ID. A server without the stream (404) or refusing another one (429) is polled.
async function watch(id) {
  showJob(id);
  let lastId = null;
  while (state.watch === id) {
    const headers = { Accept: "text/event-stream" };
    if (lastId !== null) headers["Last-Event-ID"] = lastId;
    let r;
    try {
      r = await api(jobPath(id, "events"), { headers });
    } catch (e) {
      if (state.watch !== id) return;
      const noStream = e instanceof ApiError && ((e.status === 404 && e.code !== "REQUEST_NOT_FOUND")
                                                  || e.code === "TOO_MANY_STREAMS");
      if (noStream) return poll(id);
      $("job-error").textContent = describe(e);
      if (e instanceof ApiError && e.status < 500) return; // gone, or not this key's: retrying will not help
      await sleep(POLL_MS * 4);
      continue;
    }
    if (r.status === 204) return poll(id); // its final event came on an earlier connection
    try {
      for await (const [eventId, status] of sseEvents(r.body)) {
        if (eventId !== null) lastId = eventId;
        if (await show(id, status)) return;
      }
    } catch (e) {
      if (state.watch === id) await sleep(POLL_MS); // cut mid-stream: resume where it stopped
    }
  }
}

// The (id, parsed data) of each event of a text/event-stream body; comments and retry: skipped.
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", data = [], eventId = null;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl).replace(/\r$/, "");
        buffer = buffer.slice(nl + 1);
        if (line === "") {
          if (data.length) yield [eventId, JSON.parse(data.join("\n"))];
          data = [];
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "data") data.push(text);
          else if (field === "id") eventId = text;
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// Poll the job's status until it is final (or another job is shown): servers without /events.
async function poll(id) {
  while (state.watch === id) {
    let status;
    try {
      status = await (await api(jobPath(id, "status"))).json();
    } catch (e) {
      if (state.watch !== id) return;
      $("job-error").textContent = describe(e);
      if (e instanceof ApiError && e.status < 500) return; // gone, or not this key's: polling will not help
      await sleep(POLL_MS * 4);
      continue;
    }
    if (await show(id, status)) return;
    await sleep(POLL_MS);
  }
}

// A <video src> cannot send the key: fetch the file with it and play it from a blob: URL.
async function showOutput(id) {
  try {
    const result = await (await api(jobPath(id, "result"))).json();
    const videos = result.outputs.videos;
    if (videos.length === 0) return;
    const v = videos[0];
    const blob = await (await api(jobPath(id, "outputs/0"))).blob();
    if (state.watch !== id) return;
    state.mediaUrl = URL.createObjectURL(blob);
    const player = v.format === "mp4" ? $("video") : $("animation");
    player.src = state.mediaUrl;
    player.hidden = false;
    Object.assign($("download"), { href: state.mediaUrl, download: `${id}-0.${v.format}`, hidden: false });
    $("video-info").textContent = `${v.width}x${v.height}, ${v.num_frames} frames at ${v.fps} fps, seed ${v.seed}`
      + (videos.length > 1 ? ` (first of ${videos.length} outputs)` : "");
  } catch (e) {
    $("job-error").textContent = describe(e);
  }
}

async function cancel() {
  const id = state.watch;
  if (!id) return;
  try {
    renderStatus(await (await api(jobPath(id, "cancel"), { method: "POST" })).json());
  } catch (e) {
    $("job-error").textContent = describe(e);
  }
}

// -- recent jobs --------------------------------------------------------------------------------

function recentRow(s) {
  const cell = (...children) => {
    const td = document.createElement("td");
    td.append(...children); // strings become text nodes: nothing from the server is parsed as HTML
    return td;
  };
  const show = Object.assign(document.createElement("button"), { type: "button", textContent: "Show" });
  show.addEventListener("click", () => watch(s.request_id));
  const p = s.progress;
  const row = document.createElement("tr");
  row.append(
    cell(new Date(s.created_at).toLocaleString()),
    cell(Object.assign(document.createElement("code"), { textContent: s.request_id })),
    cell(s.status + (s.error ? ` (${s.error.code})` : "")),
    cell(p.total_steps ? `${p.stage} ${p.step}/${p.total_steps}` : p.stage),
    cell(show),
  );
  return row;
}

async function refreshRecent(older = false) {
  const params = new URLSearchParams({ limit: "10" });
  if (older && state.nextBefore) params.set("before", state.nextBefore);
  try {
    const page = await (await api(`v1/requests?${params}`)).json();
    if (!older) $("recent-rows").replaceChildren();
    $("recent-rows").append(...page.requests.map(recentRow));
    state.nextBefore = page.next_before;
    $("recent-more").hidden = !page.next_before;
    $("recent-error").textContent = "";
  } catch (e) {
    $("recent-rows").replaceChildren();
    $("recent-more").hidden = true;
    $("recent-error").textContent = e.status === 401 ? "enter the API key to see its jobs" : describe(e);
  }
}

// -- wiring -------------------------------------------------------------------------------------

function init() {
  $("api-key").value = sessionStorage.getItem(KEY_NAME) ?? "";
  $("key-save").addEventListener("click", () => useKey($("api-key").value.trim()));
  $("api-key").addEventListener("keydown", (e) => {
    if (e.key === "Enter") useKey($("api-key").value.trim());
  });
  $("key-clear").addEventListener("click", () => { $("api-key").value = ""; useKey(""); });
  $("image-file").addEventListener("change", (e) => { if (e.target.files[0]) setImage(e.target.files[0]); });
  $("image-url").addEventListener("input", () => { if ($("image-url").value) clearImage(); });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.items ?? [])].find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (item) {
      e.preventDefault();
      setImage(item.getAsFile());
    }
  });
  $("lora-add").addEventListener("click", addLora);
  $("form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("recent-refresh").addEventListener("click", () => refreshRecent());
  $("recent-more").addEventListener("click", () => refreshRecent(true));
  $("submit").disabled = true;
  useKey(sessionStorage.getItem(KEY_NAME) ?? "");
}

document.addEventListener("DOMContentLoaded", init);
