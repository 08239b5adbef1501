// Demo page: send one image to /classify, /detect or /segment and show the annotated answer beside its JSON.
// Plain browser JavaScript, no build step: the gateway serves this file as it is.
"use strict";

const $ = (id) => document.getElementById(id);
let chosen = null;  // the File to send
let previewUrl = null;

function currentTask() {
  return document.querySelector('input[name="task"]:checked').value;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function showOptionsFor(task) {
  for (const option of document.querySelectorAll(".option[data-task]")) {
    option.hidden = option.dataset.task !== task;
  }
  // saliency and Grad-CAM explain the classifier only
  for (const option of document.querySelectorAll("#explain option[data-only]")) {
    option.disabled = option.dataset.only !== task;
  }
  if ($("explain").selectedOptions[0]?.disabled) $("explain").value = "";
}

// What each explanation method shows and costs (README, Explanations).
const EXPLAIN_ABOUT = {
  occlusion: "Occlusion: each cell is how much the answer's score drops when that part of the image is " +
    "covered with its mean colour (red: the model needs it). Costs grid² extra model passes per image.",
  saliency: "Saliency: how strongly each cell's pixels move the class's score (input gradient), " +
    "scaled to the strongest cell. About two extra passes.",
  gradcam: "Grad-CAM: where the classifier's feature maps support the class, scaled to the strongest cell. " +
    "About two extra passes.",
};

function choose(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image`, true);
    return;
  }
  chosen = file;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = URL.createObjectURL(file);
  $("preview").src = previewUrl;
  $("preview").hidden = false;
  $("drop-hint").textContent = `${file.name} (${Math.ceil(file.size / 1024)} KiB): drop or click to change`;
  $("run").disabled = false;
  setStatus("");
}

function requestUrl(task) {
  const params = new URLSearchParams({ annotate: $("annotate").value });
  if (task === "classify") params.set("top_k", $("top_k").value);
  if (task === "detect") {
    params.set("score_threshold", $("score_threshold").value);
    params.set("max_detections", $("max_detections").value);
  }
  if ($("explain").value) {
    params.set("explain", $("explain").value);
    params.set("explain_grid", $("explain_grid").value);
    params.set("explain_overlay", "true");
  }
  return `${task}?${params}`;  // relative: the page may be served under a route prefix
}

function labelsOf(task, result) {
  if (task === "classify") return result.predictions.map((p) => `${p.label} ${(100 * p.score).toFixed(1)}%`);
  if (task === "detect") return result.detections.map((d) => `${d.label} ${d.score.toFixed(2)}`);
  return result.segments.map((s) => `${s.label} ${(100 * s.pixel_fraction).toFixed(1)}% of pixels`);
}

function shortened(body) {
  // The annotated image and the overlays are shown as images; keep the JSON readable.
  return JSON.stringify(body, (key, value) =>
    (key === "annotated_image" || key === "overlay_png") && typeof value === "string"
      ? `${value.slice(0, 40)}… (${value.length} chars)` : value, 2);
}

function explanationsOf(task, result) {
  // [caption, explanation] of every explained answer of one image
  if (task === "classify") return result.explanation ? [[result.explanation.target, result.explanation]] : [];
  const answers = task === "detect" ? result.detections : result.segments;
  return answers.filter((a) => a.explanation).map((a) => [`${a.label} ${task === "detect" ? a.score.toFixed(2) : ""}`, a.explanation]);
}

function renderExplanations(task, result) {
  const explained = explanationsOf(task, result);
  const card = $("explain-card");
  const overlays = $("explain-overlays");
  overlays.replaceChildren();
  card.hidden = explained.length === 0 && !$("explain").value;
  if (card.hidden) return;
  const method = $("explain").value;
  $("explain-about").textContent = explained.length
    ? `${EXPLAIN_ABOUT[method] ?? ""} (${explained[0][1].passes} passes for this image)`
    : "Nothing to explain: the model found nothing in this image.";
  for (const [caption, explanation] of explained) {
    if (!explanation.overlay_png) continue;
    const figure = document.createElement("figure");
    const image = document.createElement("img");
    image.src = `data:image/png;base64,${explanation.overlay_png}`;
    image.alt = `Why ${caption}: the ${explanation.method} map over the image`;
    const text = document.createElement("figcaption");
    text.textContent = caption;
    figure.append(image, text);
    overlays.append(figure);
  }
}

function render(task, body, elapsedMs) {
  const result = body.results[0];
  $("result-image").src = result.annotated_image;
  const list = $("labels");
  list.replaceChildren();
  const labels = labelsOf(task, result);
  for (const text of labels.length ? labels : ["nothing found"]) {
    const item = document.createElement("li");
    item.textContent = text;
    list.append(item);
  }
  renderExplanations(task, result);
  $("json").textContent = shortened(body);
  $("json").classList.remove("muted");
  setStatus(`${body.model} (${body.backend}) answered in ${Math.round(elapsedMs)} ms`);
  document.body.dataset.state = "done";
}

function showFailure(message) {
  // Never leave an earlier answer on screen next to a new error.
  $("result-image").removeAttribute("src");
  $("labels").replaceChildren();
  $("explain-overlays").replaceChildren();
  $("explain-card").hidden = true;
  setStatus(message, true);
  document.body.dataset.state = "error";
}

async function run(event) {
  event.preventDefault();
  if (!chosen) return;
  const task = currentTask();
  document.body.dataset.state = "running";
  $("run").disabled = true;
  setStatus(`Running ${task}…`);
  const started = performance.now();
  try {
    const headers = { "Content-Type": chosen.type || "application/octet-stream", Accept: "application/json" };
    if ($("api_key").value) headers["X-API-Key"] = $("api_key").value;
    const response = await fetch(requestUrl(task), { method: "POST", headers, body: chosen });
    const text = await response.text();
    let body = null;
    try { body = JSON.parse(text); } catch { /* not JSON: reported below */ }
    if (!response.ok || body === null) {
      const detail = body?.error?.message ?? `the server answered HTTP ${response.status}`;
      showFailure(`${task} failed: ${detail}`);
      $("json").textContent = body ? JSON.stringify(body, null, 2) : text.slice(0, 2000);
      return;
    }
    render(task, body, performance.now() - started);
  } catch (error) {
    showFailure(`Request failed: ${error.message}`);
  } finally {
    $("run").disabled = false;
  }
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => choose(event.target.files[0]));
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    choose(event.dataTransfer.files[0]);
  });
  for (const radio of document.querySelectorAll('input[name="task"]')) {
    radio.addEventListener("change", () => showOptionsFor(currentTask()));
  }
  $("form").addEventListener("submit", run);
  showOptionsFor(currentTask());
  document.body.dataset.state = "idle";
}

init();
