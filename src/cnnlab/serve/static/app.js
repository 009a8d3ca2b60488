// The drawing page: a canvas to draw on (mouse, pen or finger via pointer events), image upload
// or drop, and live results from POST /inspect: top-k bars, the 28x28 input the model saw, and
// every layer's feature maps. No framework, no build step.
"use strict";

const canvas = document.getElementById("canvas");
const context = canvas.getContext("2d");
const statusLine = document.getElementById("status");
const hint = document.getElementById("hint");
const drop = document.getElementById("drop");
const TOP_K = 5;
// The canvas is 280 px for a 28 px input: a digit drawn about 200 px tall is scaled by ~0.1,
// so a 20 px pen lands near MNIST's 2 px strokes.
const PEN_WIDTH = canvas.width / 14;
const SEND_INTERVAL_MS = 120;

let drawing = false;
let last = null;
let hasInk = false;
let inFlight = false;
let pending = null;     // the next body to send once the current request returns
let lastSent = 0;
let generation = 0;     // bumped by "clear": answers to older requests are dropped

function resetCanvas() {
  context.fillStyle = "#fff";
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.lineCap = "round";
  context.lineJoin = "round";
  context.strokeStyle = "#000";
  context.fillStyle = "#000";
  context.lineWidth = PEN_WIDTH;
}

function point(event) {
  const box = canvas.getBoundingClientRect();
  return { x: (event.clientX - box.left) * canvas.width / box.width, y: (event.clientY - box.top) * canvas.height / box.height };
}

function dot(p) {
  context.beginPath();
  context.arc(p.x, p.y, PEN_WIDTH / 2, 0, 2 * Math.PI);
  context.fill();
}

canvas.addEventListener("pointerdown", (event) => {
  event.preventDefault();
  try {
    canvas.setPointerCapture(event.pointerId);  // keep the stroke when the finger leaves the canvas
  } catch (error) {
    // Not an active pointer (synthetic events): drawing works without capture.
  }
  drawing = true;
  last = point(event);
  dot(last);
  markInk();
});

canvas.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  event.preventDefault();
  // Coalesced events keep fast finger strokes smooth on touch screens.
  const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [event];
  for (const e of events.length ? events : [event]) {
    const p = point(e);
    context.beginPath();
    context.moveTo(last.x, last.y);
    context.lineTo(p.x, p.y);
    context.stroke();
    last = p;
  }
  markInk();
});

for (const type of ["pointerup", "pointercancel", "pointerleave"]) {
  canvas.addEventListener(type, () => {
    if (!drawing) return;
    drawing = false;
    sendCanvas(true);
  });
}

function markInk() {
  hasInk = true;
  hint.classList.add("hidden");
  sendCanvas(false);
}

function sendCanvas(force) {
  const now = performance.now();
  if (!force && now - lastSent < SEND_INTERVAL_MS) {
    // Throttled: the stroke's end (pointerup) always sends the final picture.
    return;
  }
  lastSent = now;
  canvas.toBlob((blob) => queue(blob, "canvas.png"), "image/png");
}

function queue(blob, name) {
  pending = { blob, name, generation };
  if (!inFlight) sendNext();
}

async function sendNext() {
  if (!pending) return;
  const { blob, name, generation: sentFor } = pending;
  pending = null;
  inFlight = true;
  const form = new FormData();
  form.append("file", blob, name);
  document.dispatchEvent(new CustomEvent("cnnlab:input", { detail: { blob, name } }));  // network.js
  try {
    const response = await fetch(`/inspect?top_k=${TOP_K}`, { method: "POST", body: form });
    const body = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
    if (sentFor !== generation) return;
    if (!response.ok) {
      showError(typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail));
    } else {
      showResult(body);
      document.dispatchEvent(new CustomEvent("cnnlab:result", { detail: { blob, name } }));  // explain.js
    }
  } catch (error) {
    if (sentFor === generation) showError(`cannot reach the server (${error.message})`);
  } finally {
    inFlight = false;
    if (pending) sendNext();
  }
}

function showError(message) {
  statusLine.textContent = message;
  statusLine.classList.add("error");
  clearResult();
  // A blank picture (digit models): say so where the answer would be, not only in the status line.
  document.getElementById("no-digit").hidden = !message.startsWith("no digit found");
}

function clearResult() {
  document.dispatchEvent(new Event("cnnlab:clear"));  // explain.js
  document.getElementById("prediction-label").textContent = "–";
  document.getElementById("prediction-confidence").textContent = "";
  document.getElementById("no-digit").hidden = true;
  document.getElementById("bars").replaceChildren();
  document.getElementById("model-input").removeAttribute("src");  // hidden by CSS: no broken-image icon
  document.getElementById("feature-maps").innerHTML = '<p class="note">draw something to see them</p>';
}

function percent(p) {
  return `${(100 * p).toFixed(p >= 0.995 || p < 0.001 ? 0 : 1)}%`;
}

function showResult(result) {
  statusLine.textContent = "";
  statusLine.classList.remove("error");
  document.getElementById("no-digit").hidden = true;
  const prediction = result.prediction;
  document.getElementById("prediction-label").textContent = prediction.label;
  document.getElementById("prediction-confidence").textContent = `${percent(prediction.confidence)} sure`;
  const bars = prediction.top_k.map((item) => {
    const row = document.createElement("div");
    row.className = "bar";
    row.innerHTML = '<span class="name"></span><span class="track"><span class="fill"></span></span><span class="value"></span>';
    row.querySelector(".name").textContent = item.label;
    row.querySelector(".name").title = item.label;
    row.querySelector(".fill").style.width = `${Math.max(0.5, 100 * item.probability)}%`;
    row.querySelector(".value").textContent = percent(item.probability);
    return row;
  });
  document.getElementById("bars").replaceChildren(...bars);
  document.getElementById("model-input").src = result.input_png;
  // Drawn layers and the ones left out (batchnorm, dropout: a note in their place), in layer order.
  const layers = [...result.feature_maps, ...(result.skipped_layers || [])].sort((a, b) => a.layer - b.layer);
  document.getElementById("feature-maps").replaceChildren(...layers.map((layer) => (layer.png ? mapFigure(layer) : skippedFigure(layer))));
}

function layerCaption(layer, detail) {
  const caption = document.createElement("figcaption");
  caption.innerHTML = "<b></b> <span></span>";
  caption.querySelector("b").textContent = `${layer.layer}. ${layer.name}`;
  caption.querySelector("span").textContent = `→ ${layer.shape.join("×")}${detail}`;
  return caption;
}

function mapFigure(layer) {
  const figure = document.createElement("figure");
  const image = document.createElement("img");
  image.alt = `feature maps of layer ${layer.layer}`;
  image.onload = () => {
    // Small maps are enlarged with crisp pixels; big grids are kept within the page.
    const scale = Math.max(1, Math.min(6, Math.floor(300 / image.naturalWidth)));
    image.style.width = `${image.naturalWidth * scale}px`;
  };
  image.src = layer.png;
  const [low, high] = layer.scale;
  const range = layer.colormap === "RdBu_r" ? ` · blue ${low.toPrecision(2)}, white 0, red +${high.toPrecision(2)}`
    : ` · black 0, bright ${high.toPrecision(2)}`;
  figure.append(image, layerCaption(layer, range));
  return figure;
}

function skippedFigure(layer) {
  const figure = document.createElement("figure");
  figure.className = "skipped";
  const reason = document.createElement("p");
  reason.className = "note";
  reason.textContent = layer.reason;
  figure.append(layerCaption(layer, ""), reason);
  return figure;
}

document.getElementById("clear").addEventListener("click", () => {
  generation += 1;
  pending = null;
  hasInk = false;
  resetCanvas();
  hint.classList.remove("hidden");
  statusLine.textContent = "";
  statusLine.classList.remove("error");
  clearResult();
});

function useFile(file) {
  if (!file) return;
  generation += 1;
  hint.classList.add("hidden");
  statusLine.classList.remove("error");
  statusLine.textContent = `${file.name}`;
  resetCanvas();
  // Show the picture on the canvas, but classify the file itself (full resolution, exact bytes).
  const url = URL.createObjectURL(file);
  const picture = new Image();
  picture.onload = () => {
    const scale = Math.min(canvas.width / picture.width, canvas.height / picture.height);
    const w = picture.width * scale, h = picture.height * scale;
    context.drawImage(picture, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
    URL.revokeObjectURL(url);
  };
  picture.onerror = () => URL.revokeObjectURL(url);
  picture.src = url;
  queue(file, file.name);
}

document.getElementById("file").addEventListener("change", (event) => {
  useFile(event.target.files[0]);
  event.target.value = "";
});

for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (event) => { event.preventDefault(); drop.classList.add("dragging"); });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, () => drop.classList.remove("dragging"));
}
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  useFile(event.dataTransfer.files[0]);
});

async function loadModelInfo() {
  try {
    const info = await (await fetch("/model")).json();
    const [c, h, w] = info.input_shape;
    const accuracy = typeof info.metrics.test_accuracy === "number" ? ` · test accuracy ${(100 * info.metrics.test_accuracy).toFixed(2)}%` : "";
    document.getElementById("model-info").textContent =
      `${info.name} · ${info.classes.length} classes · input ${c}×${h}×${w} (${info.preprocessing.kind}) · ` +
      `${info.parameters.toLocaleString()} parameters${accuracy}`;
    document.getElementById("input-note").textContent =
      info.preprocessing.kind === "digit"
        ? `${h}×${w}, made like MNIST: inverted to white on black, cropped, fitted into ${Math.round(h * 20 / 28)}×${Math.round(w * 20 / 28)}, centred by mass`
        : `${h}×${w}, resized and centre-cropped as in training`;
  } catch (error) {
    document.getElementById("model-info").textContent = "model info unavailable";
  }
}

resetCanvas();
loadModelInfo();
