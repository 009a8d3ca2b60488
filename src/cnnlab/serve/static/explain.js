// "Where did it look?": a Grad-CAM overlay on "what the model sees", switched on and off by the
// checkbox under it. app.js announces each classified image ("cnnlab:result", with the image sent)
// and each reset ("cnnlab:clear"); while the switch is on, the same image goes to POST /explain and
// the answer's transparent heatmap is laid over the model input. Only the latest image is explained.
"use strict";

(() => {
  const toggle = document.getElementById("explain-toggle");
  const note = document.getElementById("explain-note");
  const caveat = document.getElementById("explain-caveat");
  const input = document.getElementById("model-input");
  if (!toggle || !input) return;

  // The overlay sits exactly on the input picture: both in one positioned box.
  const box = document.createElement("span");
  box.className = "explain-box";
  const overlay = document.createElement("img");
  overlay.id = "explain-overlay";
  overlay.alt = "Grad-CAM heatmap over the model input";
  overlay.hidden = true;
  input.replaceWith(box);
  box.append(input, overlay);

  let latest = null;      // { blob, name } of the last classified image
  let inFlight = false;
  let pending = false;    // a newer image arrived while a request was running
  let generation = 0;     // bumped on clear: answers for older images are dropped

  function hideOverlay(message) {
    overlay.hidden = true;
    overlay.removeAttribute("src");
    note.textContent = message || "";
    if (caveat) { caveat.textContent = ""; caveat.hidden = true; }
  }

  async function explainLatest() {
    if (!toggle.checked || !latest) return;
    if (inFlight) { pending = true; return; }
    inFlight = true;
    pending = false;
    const sentFor = generation;
    const form = new FormData();
    form.append("file", latest.blob, latest.name);
    try {
      const response = await fetch("/explain?method=gradcam&top_k=1", { method: "POST", body: form });
      const body = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
      if (sentFor !== generation || !toggle.checked) return;
      if (!response.ok) {
        hideOverlay(`no Grad-CAM: ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`);
        return;
      }
      overlay.src = body.overlay_png;
      overlay.hidden = false;
      note.textContent = `Grad-CAM for “${body.target.label}” at layer ${body.layer_name}: bright = where the network found evidence`;
      // The faithfulness check's verdict for Grad-CAM on this model, beside the map it is about.
      if (caveat) { caveat.textContent = body.caveat || ""; caveat.hidden = !body.caveat; }
    } catch (error) {
      if (sentFor === generation) hideOverlay(`no Grad-CAM (${error.message})`);
    } finally {
      inFlight = false;
      if (pending) explainLatest();
    }
  }

  document.addEventListener("cnnlab:result", (event) => {
    latest = event.detail;
    explainLatest();
  });
  document.addEventListener("cnnlab:clear", () => {
    generation += 1;
    latest = null;
    pending = false;
    hideOverlay();
  });
  toggle.addEventListener("change", () => {
    if (toggle.checked) explainLatest();
    else hideOverlay();
  });
})();
