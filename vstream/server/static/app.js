// The vstream page: push the webcam or a local video file over WS /v1/realtime, ask questions on the same socket,
// and show what the bounded memory holds. No build step, no dependencies. The API key is typed by the person into
// the key field; the server answers with an HttpOnly session cookie, and the key is forgotten at once.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { ws: null, streamId: null, fps: 1, timer: null, answer: null, lastTime: 0, ingested: 0,
                polling: null, source: null, stopped: false, triggers: [], memory: null };

function fmt(t) { return t == null ? "–" : `${Number(t).toFixed(1)} s`; }
function frameUrl(t) { return `/v1/streams/${state.streamId}/frames?t=${encodeURIComponent(t)}`; }

async function boot() {
  const ready = await fetch("/health/ready").then((r) => r.json()).catch(() => null);
  $("server").textContent = ready && ready.status === "ready" ? `model ${ready.model}` : "server not ready";
  if (ready && ready.auth_required && sessionStorage.getItem("vstream.unlocked") !== "1") {
    $("unlock").hidden = false;
  }
}

$("unlock").addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = $("key").value;
  $("key").value = "";
  const r = await fetch("/v1/auth/cookie", { method: "POST", headers: { Authorization: `Bearer ${key}` } });
  if (r.status === 204) {
    sessionStorage.setItem("vstream.unlocked", "1");
    $("unlock").hidden = true;
    $("unlock-error").textContent = "";
  } else {
    $("unlock-error").textContent = "wrong key";
  }
});

// ------------------------------------------------------------------------------------------------ the socket

function openSession() {
  return new Promise((resolve, reject) => {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}/v1/realtime`);
    state.ws = ws;
    ws.onmessage = (msg) => {
      const event = JSON.parse(msg.data);
      if (event.type === "session.created") {
        state.streamId = event.session.stream_id;
        state.fps = event.session.fps;
        $("s-id").textContent = state.streamId;
        $("send").disabled = false;
        $("stop").disabled = false;
        $("watch-add").disabled = false;
        startPolling();
        resolve(event);
      } else {
        onEvent(event);
      }
    };
    ws.onerror = () => reject(new Error("the realtime socket could not be opened"));
    ws.onclose = (e) => {
      if (!state.stopped) showNotice(`session closed (${e.code}${e.reason ? ": " + e.reason : ""})`);
      $("send").disabled = true;
      stopSource();
    };
  });
}

const ackWaiters = [];

function onEvent(event) {
  switch (event.type) {
    case "input_video_frame.ack":
      $("s-received").textContent = event.received;
      $("s-ingested").textContent = event.ingested;
      $("s-dropped").textContent = event.dropped;
      state.ingested = event.ingested;
      (ackWaiters.shift() || (() => {}))(event);
      break;
    case "response.created": startAnswer(event.response); break;
    case "response.output_text.delta": if (state.answer) state.answer.text.textContent += event.delta; break;
    case "response.done": endAnswer(event.response); break;
    case "watch.triggered":
    case "watch.cleared":
      onWatchEvent(event.event);
      break;
    case "session.closing":
      showNotice(`the server closes this session (${event.reason}) in ${event.time_left_s.toFixed(0)} s`);
      break;
    case "stream.moving":  // a cluster moves the stream to another replica: frames are held until it is back
      showNotice("the stream is moving to another replica: frames are held until it is back");
      break;
    case "stream.moved": $("notice").hidden = true; break;
    case "error":
      (ackWaiters.shift() || (() => {}))(null);
      showNotice(`error: ${event.error.message}`);
      break;
    default: break;
  }
}

function showNotice(text) { $("notice").hidden = false; $("notice").textContent = text; }

// ------------------------------------------------------------------------------------------------ frames

function grab() {
  const video = $("preview"), canvas = $("grab");
  const scale = Math.min(1, 640 / (video.videoWidth || 640));
  canvas.width = Math.round((video.videoWidth || 640) * scale);
  canvas.height = Math.round((video.videoHeight || 480) * scale);
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.85));
}

async function startWebcam() {
  const media = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  const video = $("preview");
  video.srcObject = media;
  await video.play();
  state.source = media;
  await openSession();
  state.timer = setInterval(async () => {  // binary JPEG frames at the stream's rate, timed by the server
    if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(await grab());
  }, 1000 / state.fps);
}

function toBase64(blob) {
  return new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",")[1]);
    reader.readAsDataURL(blob);
  });
}

function seek(video, t) {
  return new Promise((resolve) => { video.addEventListener("seeked", resolve, { once: true }); video.currentTime = t; });
}

async function startFile(file) {
  const video = $("preview");
  video.srcObject = null;
  video.src = URL.createObjectURL(file);
  await new Promise((resolve, reject) => {
    video.addEventListener("loadeddata", resolve, { once: true });
    video.addEventListener("error", () => reject(new Error("this browser cannot play the file")), { once: true });
  });
  await openSession();
  // Step through the file at the stream's rate, each frame timed by its place in the file, the next one sent
  // when the server has acknowledged the last (so nothing is dropped and the page never runs ahead).
  for (let t = 0; t < video.duration && !state.stopped; t += 1 / state.fps) {
    await seek(video, t);
    const image = await toBase64(await grab());
    const acked = new Promise((resolve) => ackWaiters.push(resolve));
    state.ws.send(JSON.stringify({ type: "input_video_frame.append", timestamp: t, image }));
    await acked;
  }
  showNotice("the whole file was sent; ask away");
}

function stopSource() {
  clearInterval(state.timer);
  state.timer = null;
  if (state.source && state.source.getTracks) state.source.getTracks().forEach((track) => track.stop());
  state.source = null;
}

$("webcam").addEventListener("click", () => { disableSources(); startWebcam().catch((e) => showNotice(e.message)); });
$("file").addEventListener("change", (e) => {
  if (!e.target.files.length) return;
  disableSources();
  startFile(e.target.files[0]).catch((err) => showNotice(err.message));
});
$("stop").addEventListener("click", () => {
  state.stopped = true;
  stopSource();
  if (state.ws) state.ws.close(1000, "stopped by the page");
  clearInterval(state.polling);
  $("stop").disabled = true;
});

function disableSources() { $("webcam").disabled = true; $("file").disabled = true; }

// ------------------------------------------------------------------------------------------------ answers

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || !state.ws || state.ws.readyState !== WebSocket.OPEN) return;
  const li = document.createElement("li");
  li.className = "q";
  li.textContent = question;
  $("log").appendChild(li);
  $("question").value = "";
  state.ws.send(JSON.stringify({ type: "response.create", question }));
});

$("cancel").addEventListener("click", () => state.ws && state.ws.send(JSON.stringify({ type: "response.cancel" })));

function startAnswer(response) {
  const li = document.createElement("li");
  li.className = "a";
  li.dataset.response = response.id;
  const text = document.createElement("span");
  text.className = "text";
  li.appendChild(text);
  li.appendChild(timeChips(response.vstream));
  $("log").appendChild(li);
  state.answer = { li, text };
  $("cancel").hidden = false;
  $("send").disabled = true;
}

function endAnswer(response) {
  if (state.answer) {
    state.answer.li.classList.add(response.status);
    state.answer.li.dataset.status = response.status;
  }
  state.answer = null;
  $("cancel").hidden = true;
  $("send").disabled = false;
  $("log").scrollTop = $("log").scrollHeight;
}

function timeChips(times) {
  const box = document.createElement("div");
  box.className = "times";
  const label = document.createElement("span");
  label.className = "muted";
  label.textContent = `rests on memory at ${fmt(times.stream_time)}:`;
  box.appendChild(label);
  const add = (t, kind) => {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = `time ${kind}`;
    chip.textContent = fmt(t);
    chip.title = `${kind} frame at ${t} s: click to see it`;
    chip.addEventListener("click", () => showFrame(t, kind));
    box.appendChild(chip);
  };
  times.retrieved_times.forEach((t) => add(t, "retrieved"));
  times.spatial_times.forEach((t) => add(t, "spatial"));
  return box;
}

function showFrame(t, kind) {
  $("viewer").hidden = false;
  $("viewer-img").src = frameUrl(t);
  $("viewer-caption").textContent = `${kind} frame at ${fmt(t)}`;
}

// ------------------------------------------------------------------------------------------------ memory panel

function startPolling() {
  clearInterval(state.polling);
  state.polling = setInterval(refresh, 1000);
}

async function refresh() {
  if (!state.streamId) return;
  const view = await fetch(`/v1/streams/${state.streamId}`).then((r) => (r.ok ? r.json() : null));
  if (!view) return;
  const s = view.stats;
  $("s-time").textContent = fmt(s.stream_time);
  $("s-memory").textContent = `${s.memory_tokens} tokens, ${(s.memory_bytes / 1024).toFixed(0)} KiB`;
  const ttft = s.latency.first_token;
  $("s-ttft").textContent = ttft.count ? `${ttft.p50_ms.toFixed(0)} ms` : "–";
  refreshWatches();
  if (s.frames_encoded < 1) return;
  const memory = await fetch(`/v1/streams/${state.streamId}/memory`).then((r) => (r.ok ? r.json() : null));
  if (memory) drawMemory(memory);
}

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs, title) {
  const node = document.createElementNS(SVG, tag);
  Object.entries(attrs).forEach(([k, v]) => node.setAttribute(k, v));
  if (title) {
    const t = document.createElementNS(SVG, "title");
    t.textContent = title;
    node.appendChild(t);
  }
  return node;
}

function drawMemory(memory) {
  state.memory = memory;
  const tk = memory.tokens;
  $("m-summary").textContent = `${tk.total} tokens (abstract ${tk.abstract}, temporal ${tk.temporal}, retrieved ` +
    `${tk.retrieved}, spatial ${tk.spatial}), ${(memory.bytes / 1024).toFixed(0)} KiB, ${memory.frames_seen} frames`;
  const end = Math.max(memory.stream_time, 1);
  const x = (t) => (t / end) * 980 + 10;
  const line = $("timeline");
  line.replaceChildren();
  line.appendChild(svg("line", { x1: 10, x2: 990, y1: 100, y2: 100, stroke: "#b8bfcc" }));
  const heaviest = Math.max(...memory.temporal.map((c) => c.weight), 1);
  memory.temporal.forEach((c) => {
    const h = 12 + 70 * (c.weight / heaviest);
    line.appendChild(svg("rect", { x: x(c.first), y: 100 - h, width: Math.max(3, x(c.last) - x(c.first)), height: h,
      fill: "#2f6fdf", "fill-opacity": 0.25 + 0.5 * (c.weight / heaviest), class: "cluster", rx: 2 },
      `cluster ${fmt(c.first)}–${fmt(c.last)}, ${c.weight.toFixed(0)} frames`));
  });
  const marks = [...memory.retrieved.map((f) => [f, "#e0843a", "retrieved"]),
                 ...memory.spatial.map((f) => [f, "#2a9d6a", "spatial"])];
  marks.forEach(([f, colour, kind]) => {
    const mark = svg("circle", { cx: x(f.time), cy: 110, r: 5, fill: colour, class: kind }, `${kind} ${fmt(f.time)}`);
    mark.addEventListener("click", () => showFrame(f.time, kind));
    line.appendChild(mark);
  });
  state.triggers.forEach((e) => {
    const mark = svg("rect", { x: x(e.stream_time) - 2, y: 4, width: 4, height: 100, fill: "#c0392b", class: "trigger",
      "data-watch": e.watch_id }, `“${e.condition}” triggered at ${fmt(e.stream_time)} (score ${e.score.toFixed(2)})`);
    mark.addEventListener("click", () => showFrame(e.spatial_times.at(-1) ?? e.stream_time, "triggering"));
    line.appendChild(mark);
  });
  line.appendChild(svg("text", { x: 10, y: 14, "font-size": 11, fill: "#6b7385" }, null)).textContent = "0 s";
  line.appendChild(svg("text", { x: 990, y: 14, "font-size": 11, fill: "#6b7385", "text-anchor": "end" }, null))
    .textContent = fmt(memory.stream_time);
  thumbs($("retrieved"), memory.retrieved, "retrieved");
  thumbs($("spatial"), memory.spatial.slice(-1), "spatial");
}

function thumbs(box, frames, kind) {
  const key = frames.map((f) => f.time).join(",");
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  box.replaceChildren(...frames.filter((f) => f.thumbnail).map((f) => {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = f.thumbnail;
    img.alt = `${kind} frame at ${fmt(f.time)}`;
    const cap = document.createElement("figcaption");
    cap.textContent = fmt(f.time);
    fig.append(img, cap);
    fig.addEventListener("click", () => showFrame(f.time, kind));
    return fig;
  }));
}

// ------------------------------------------------------------------------------------------------ watches
// Standing questions on this page's stream: listed from GET …/watches, added and deleted there; their triggers come
// on the socket and are marked on the memory timeline (a click shows the frame the trigger rests on).

function watchesUrl(id) { return `/v1/streams/${state.streamId}/watches${id ? "/" + id : ""}`; }

async function refreshWatches() {
  if (!state.streamId) return;
  const list = await fetch(watchesUrl()).then((r) => (r.ok ? r.json() : null));
  if (list) drawWatches(list.data);
}

function drawWatches(watches) {
  $("watches").replaceChildren(...watches.map((w) => {
    const li = document.createElement("li");
    li.dataset.watch = w.id;
    li.className = w.active ? "active" : "";
    const text = document.createElement("span");
    text.className = "condition";
    text.textContent = w.condition;
    const info = document.createElement("span");
    info.className = "muted";
    const score = w.last_score == null ? "–" : w.last_score.toFixed(2);
    info.textContent = w.error ? `failing: ${w.error}` : `${w.events} events, score ${score}`;
    const del = document.createElement("button");
    del.type = "button";
    del.className = "watch-delete";
    del.textContent = "Delete";
    del.addEventListener("click", () => deleteWatch(w.id));
    li.append(text, info, del);
    return li;
  }));
}

$("watch-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const condition = $("watch-condition").value.trim();
  if (!condition || !state.streamId) return;
  const body = { condition, threshold: Number($("watch-threshold").value || 0) };
  const r = await fetch(watchesUrl(), { method: "POST", headers: { "Content-Type": "application/json" },
                                        body: JSON.stringify(body) });
  const answer = await r.json().catch(() => null);
  $("watch-error").hidden = r.ok;
  if (!r.ok) {
    $("watch-error").textContent = answer && answer.error ? answer.error.message : `HTTP ${r.status}`;
    return;
  }
  $("watch-condition").value = "";
  refreshWatches();
});

async function deleteWatch(id) {
  await fetch(watchesUrl(id), { method: "DELETE" });
  refreshWatches();
}

function onWatchEvent(e) {
  if (e.type === "watch.triggered") {
    state.triggers.push(e);
    if (state.memory) drawMemory(state.memory);
  }
  refreshWatches();
}

boot();
