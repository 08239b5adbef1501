// Demo page, live mode: stream the camera (or a chosen video file) to stream/<task> over a WebSocket
// and draw each answer over the picture. One frame is in flight at a time (the next frame is grabbed
// when the answer comes), at most MAX_FPS a second; the server drops stale frames on its own anyway.
// `window.cvserveLive` holds the stream's state and recent answers (the browser tests read it).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const MAX_FPS = 15;
  const HISTORY = 300;  // answers kept in cvserveLive.history
  // service/imaging/annotate.py's palette (Kelly's colours), indexed by class id, so boxes match the drawn images
  const PALETTE = ["#ffb300", "#803e75", "#ff6800", "#a6bdd7", "#c10020", "#cea262", "#817066", "#007d34",
    "#f6768e", "#00538a", "#ff7a5c", "#53377a", "#ff8e00", "#b32851", "#f4c800", "#7f180d", "#93aa00",
    "#593315", "#f13a13", "#232c16", "#00b4c8", "#78dc78"];
  const live = (window.cvserveLive = { state: "idle", sent: 0, answered: 0, errors: [], history: [], closed: null });
  const grab = document.createElement("canvas");
  let socket = null;
  let media = null;
  let fileUrl = null;
  let inFlight = false;
  let lastSent = 0;
  let timer = null;

  function setLive(state, text, isError = false) {
    live.state = state;
    document.body.dataset.live = state;
    $("live-status").textContent = text;
    $("live-status").classList.toggle("error", isError);
    $("live-stop").disabled = !(state === "starting" || state === "streaming");
  }

  function currentTask() {
    return document.querySelector('input[name="task"]:checked').value;
  }

  function streamUrl(task) {
    const params = new URLSearchParams();
    if (task === "classify") params.set("top_k", $("top_k").value);
    if (task === "detect") {
      params.set("score_threshold", $("score_threshold").value);
      params.set("max_detections", $("max_detections").value);
    }
    if (task === "segment") params.set("annotate", "jpeg");  // masks come back drawn
    const url = new URL(`stream/${task}?${params}`, location.href);  // relative: the page may sit under a prefix
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    return url.href;
  }

  async function startCamera() {
    stop();
    try {
      media = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
    } catch (error) {
      setLive("error", `camera: ${error.message}`, true);
      return;
    }
    $("live-video").srcObject = media;
    await begin();
  }

  async function startFile(file) {
    if (!file) return;
    stop();
    fileUrl = URL.createObjectURL(file);
    const video = $("live-video");
    video.srcObject = null;
    video.src = fileUrl;
    video.loop = true;
    await begin();
  }

  async function begin() {
    const video = $("live-video");
    try {
      await video.play();
    } catch (error) {
      setLive("error", `cannot play: ${error.message}`, true);
      return;
    }
    const key = $("api_key").value;  // browsers cannot set headers on a WebSocket: the key rides as a subprotocol
    const task = currentTask();
    const ws = new WebSocket(streamUrl(task), key ? ["cvserve", `cvserve.key.${key}`] : ["cvserve"]);
    socket = ws;
    Object.assign(live, { task, sent: 0, answered: 0, errors: [], history: [], closed: null });
    inFlight = false;
    setLive("starting", `connecting to stream/${task}…`);
    ws.onmessage = (event) => {
      if (socket === ws) onMessage(JSON.parse(event.data));
    };
    ws.onclose = (event) => {
      if (socket !== ws) return;  // an earlier stream, stopped by the page
      live.closed = { code: event.code, reason: event.reason };
      const why = event.reason ? `: ${event.reason}` : "";
      setLive("error", `the stream closed (${event.code}${why})`, true);
      socket = null;
      stopMedia();
    };
  }

  function onMessage(message) {
    if (message.type === "ready") {
      setLive("streaming", `streaming to ${message.endpoint} (${message.model})`);
      sendFrame();
      return;
    }
    inFlight = false;
    if (message.type === "error") {
      live.errors.push(message.error.code);
    } else {
      live.answered += 1;
      live.history.push({ frame: message.frame, latency_ms: message.latency_ms, result: message.result });
      if (live.history.length > HISTORY) live.history.shift();
      draw(message);
    }
    const stats = message.stats;
    const dropped = stats.dropped_stale + stats.dropped_rate;
    $("live-status").textContent =
      `${stats.answered} answered · ${dropped} dropped · ${stats.errors} errors · last ${message.latency_ms ?? "-"} ms`;
    clearTimeout(timer);
    timer = setTimeout(sendFrame, Math.max(0, lastSent + 1000 / MAX_FPS - performance.now()));
  }

  function sendFrame() {
    if (!socket || socket.readyState !== WebSocket.OPEN || inFlight) return;
    const video = $("live-video");
    if (!video.videoWidth) {
      timer = setTimeout(sendFrame, 50);  // no picture yet
      return;
    }
    grab.width = video.videoWidth;
    grab.height = video.videoHeight;
    grab.getContext("2d").drawImage(video, 0, 0);
    inFlight = true;
    grab.toBlob((blob) => {
      if (!blob || !socket || socket.readyState !== WebSocket.OPEN) {
        inFlight = false;
        return;
      }
      socket.send(blob);
      live.sent += 1;
      lastSent = performance.now();
    }, "image/jpeg", 0.85);
  }

  function draw(message) {
    const result = message.result;
    const overlay = $("live-overlay");
    overlay.width = result.image.width;
    overlay.height = result.image.height;
    const context = overlay.getContext("2d");
    context.clearRect(0, 0, overlay.width, overlay.height);
    let labels = [];
    if (message.annotated_image) {
      const picture = new Image();
      picture.onload = () => context.drawImage(picture, 0, 0, overlay.width, overlay.height);
      picture.src = message.annotated_image;
    }
    if (result.detections) {
      const line = Math.max(2, Math.round(Math.min(overlay.width, overlay.height) / 160));
      context.font = `${Math.max(11, Math.round(overlay.height / 24))}px sans-serif`;
      context.textBaseline = "bottom";
      for (const d of result.detections) {
        const [x0, y0, x1, y1] = d.box;
        const text = `${d.label}${d.track_id != null ? ` #${d.track_id}` : ""} ${d.score.toFixed(2)}`;
        context.strokeStyle = context.fillStyle = PALETTE[d.class_id % PALETTE.length];
        context.lineWidth = line;
        context.strokeRect(x0, y0, x1 - x0, y1 - y0);
        const width = context.measureText(text).width + 6;
        const height = parseInt(context.font, 10) + 4;
        context.fillRect(x0, Math.max(0, y0 - height), width, height);
        context.fillStyle = "#000";
        context.fillText(text, x0 + 3, Math.max(height, y0) - 2);
        labels.push(text);
      }
    } else if (result.predictions) {
      const best = result.predictions[0];
      context.font = `${Math.max(12, Math.round(overlay.height / 14))}px sans-serif`;
      context.textBaseline = "top";
      const text = `${best.label} ${(100 * best.score).toFixed(1)}%`;
      context.fillStyle = "rgba(20, 20, 20, 0.75)";
      context.fillRect(4, 4, context.measureText(text).width + 10, parseInt(context.font, 10) + 8);
      context.fillStyle = "#fff";
      context.fillText(text, 9, 8);
      labels = result.predictions.map((p) => `${p.label} ${(100 * p.score).toFixed(1)}%`);
    } else if (result.segments) {
      labels = result.segments.map((s) => `${s.label} ${(100 * s.pixel_fraction).toFixed(1)}%`);
    }
    const list = $("live-labels");
    list.replaceChildren();
    for (const text of labels.length ? labels : ["nothing found"]) {
      const item = document.createElement("li");
      item.textContent = text;
      list.append(item);
    }
  }

  function stopMedia() {
    clearTimeout(timer);
    const video = $("live-video");
    video.pause();
    if (media) media.getTracks().forEach((track) => track.stop());
    media = null;
    video.srcObject = null;
    if (fileUrl) URL.revokeObjectURL(fileUrl);
    fileUrl = null;
  }

  function stop() {
    if (socket) {
      const ws = socket;
      socket = null;  // its close event is then ignored
      ws.close(1000);
      setLive("stopped", "stopped");
    }
    stopMedia();
  }

  $("live-camera").addEventListener("click", startCamera);
  $("live-file").addEventListener("change", (event) => startFile(event.target.files[0]));
  $("live-stop").addEventListener("click", stop);
  setLive("idle", "");
})();
