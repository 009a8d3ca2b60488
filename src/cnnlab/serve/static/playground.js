// The convolution playground: input size, kernel, stride, padding (a number, same, valid),
// dilation and padding mode; the output size by ⌊(n + 2p − d(k − 1) − 1)/s⌋ + 1, written out as
// `cnnlab summary` writes it, and a setting that cannot work said in the words layers.py uses.
// An animation steps the kernel over a small input (padding cells drawn) and fills the output in.
// "Use this layer" loads one of the model's conv or pooling layers (network.js sends the spec).
"use strict";

(function () {
  const root = document.getElementById("playground");
  if (!root) return;
  const field = (name) => document.getElementById(`pg-${name}`);
  const canvas = field("canvas");
  const context = canvas.getContext("2d");
  let timer = null, step = 0, current = null;

  // One axis of a conv layer, as layers.py's Conv.check and Conv.trace decide it. Returns
  // {out, padBefore, padAfter, formula, warning} or {error}.
  function convAxis(n, k, s, padding, d, mode) {
    if (padding === "same" && s !== 1) {
      return { error: `padding 'same' needs stride 1 in PyTorch (got stride ${s}); use padding ${Math.floor(k / 2)} instead` };
    }
    let before, after, out, formula;
    if (padding === "same") {  // PyTorch pads d(k − 1) in total, the odd pixel bottom/right
      const total = d * (k - 1);
      before = Math.floor(total / 2);
      after = total - before;
      out = n;
      formula = `'same' pads ${before}+${after}: (${n} + ${total} − ${total + 1})/1 + 1 = ${n}`;
    } else {
      const p = padding === "valid" ? 0 : padding;
      before = after = p;
      out = Math.floor((n + 2 * p - d * (k - 1) - 1) / s) + 1;
      const kernel = d !== 1 ? `${d}·(${k} − 1) − 1` : `${k}`;
      formula = `⌊(${n} + 2·${p} − ${kernel})/${s}⌋ + 1 = ${out}`;
      if (out < 1) {
        const plain = d !== 1 ? `${d}*(${k} - 1) - 1` : `${k}`;
        return { error: `input ${n}x${n} gives (${n} + 2*${p} - ${plain})/${s} + 1 = ${out}; the feature map would be smaller than 1x1` };
      }
    }
    const widest = padding === "same" ? d * (k - 1) - before : before;
    if (mode === "reflect" && widest >= n) return { error: `reflect padding ${widest} must be smaller than its input size ${n}` };
    if (mode === "circular" && widest > n) return { error: `circular padding ${widest} must be at most its input size ${n}` };
    const warnings = [];
    if (mode === "reflect" && padding !== "same" && padding !== "valid" && widest > 0 && widest === n - 1) {
      warnings.push(`reflect padding ${widest} is at its limit for input size ${n} (it must stay below the input size)`);
    }
    if (padding !== "same" && padding !== "valid") {
      const dropped = (n + 2 * before - d * (k - 1) - 1) % s;
      if (dropped) warnings.push(`floor division drops the last ${dropped} row(s)/column(s) of the padded input`);
    }
    const warning = warnings.join("; ");
    return { out, padBefore: before, padAfter: after, formula, warning };
  }

  function read() {
    const number = (name) => Number(field(name).value);
    const kind = field("padding-kind").value;
    return {
      n: number("n"), k: number("k"), s: number("s"), d: number("d"), mode: field("mode").value,
      padding: kind === "number" ? number("p") : kind,
    };
  }

  function update() {
    const settings = read();
    field("p").disabled = field("padding-kind").value !== "number";
    const answer = convAxis(settings.n, settings.k, settings.s, settings.padding, settings.d, settings.mode);
    current = { settings, answer };
    const result = field("result");
    result.className = answer.error ? "pg-result error" : "pg-result";
    result.textContent = answer.error ? `does not fit: ${answer.error}`
      : `output ${answer.out}×${answer.out}:  ${answer.formula}` + (answer.warning ? `  (warning: ${answer.warning})` : "");
    root.dataset.out = answer.error ? "" : answer.out;
    step = 0;
    draw();
  }

  function draw() {
    const { settings, answer } = current;
    context.clearRect(0, 0, canvas.width, canvas.height);
    if (answer.error) return;
    const { n, k, s, d } = settings;
    const padded = n + answer.padBefore + answer.padAfter;
    const out = answer.out;
    const cell = Math.max(6, Math.min(22, Math.floor(Math.min(300 / padded, canvas.height / Math.max(padded, out)))));
    const outLeft = padded * cell + 40;
    const positions = out * out;
    const position = step % positions;
    const oi = Math.floor(position / out), oj = position % out;
    for (let r = 0; r < padded; r++) {
      for (let c = 0; c < padded; c++) {
        const inside = r >= answer.padBefore && r < answer.padBefore + n && c >= answer.padBefore && c < answer.padBefore + n;
        context.fillStyle = inside ? "#e9ecf5" : "#fff";
        context.fillRect(c * cell, r * cell, cell - 1, cell - 1);
        if (!inside) {
          context.strokeStyle = "#c3c8d4";
          context.setLineDash([2, 2]);
          context.strokeRect(c * cell + 0.5, r * cell + 0.5, cell - 2, cell - 2);
          context.setLineDash([]);
        }
      }
    }
    // the kernel's taps at output (oi, oj): rows oi·s + u·d of the padded input
    context.fillStyle = "rgba(59, 91, 219, 0.55)";
    for (let u = 0; u < k; u++) {
      for (let v = 0; v < k; v++) {
        context.fillRect((oj * s + v * d) * cell, (oi * s + u * d) * cell, cell - 1, cell - 1);
      }
    }
    context.strokeStyle = "#3b5bdb";
    context.lineWidth = 2;
    context.strokeRect(oj * s * cell, oi * s * cell, (d * (k - 1) + 1) * cell - 1, (d * (k - 1) + 1) * cell - 1);
    context.lineWidth = 1;
    for (let r = 0; r < out; r++) {
      for (let c = 0; c < out; c++) {
        const index = r * out + c;
        context.fillStyle = index < position ? "#91a7ff" : index === position ? "#3b5bdb" : "#f1f3f5";
        context.fillRect(outLeft + c * cell, r * cell, cell - 1, cell - 1);
      }
    }
    context.fillStyle = "#6b7385";
    context.font = "12px system-ui, sans-serif";
    context.fillText(`output (${oi}, ${oj})`, outLeft, out * cell + 14);
  }

  function play() {
    if (timer) {
      clearInterval(timer);
      timer = null;
      field("play").textContent = "Play";
      return;
    }
    field("play").textContent = "Pause";
    timer = setInterval(() => { step += 1; draw(); }, 350);
  }

  function useLayer(node, inputShape) {
    const window = node.window;
    field("n").value = inputShape[1];
    field("k").value = window.kernel[0];
    field("s").value = window.stride[0];
    field("d").value = window.dilation[0];
    const setting = window.padding_setting;
    field("padding-kind").value = typeof setting === "string" ? setting : "number";
    field("p").value = window.padding[0];
    field("mode").value = (node.weights && node.weights.padding_mode) || "zeros";
    update();
  }

  function useSpec(spec) {
    const byId = new Map(spec.nodes.map((n) => [n.id, n]));
    const select = field("layer");
    select.replaceChildren();
    for (const node of spec.nodes) {
      if (!node.window) continue;
      const option = document.createElement("option");
      option.value = node.id;
      option.textContent = `${node.path}: ${node.row.layer}`;
      select.append(option);
    }
    field("use").disabled = !select.options.length;
    field("use").onclick = () => {
      const node = byId.get(select.value);
      useLayer(node, byId.get(node.inputs[0]).shape);
    };
  }

  // network.js sends the model's layers when it has them (the offline copy: before this script ran)
  document.addEventListener("cnnlab:network-spec", (event) => useSpec(event.detail));
  const known = window.cnnlabNetwork && window.cnnlabNetwork.state().spec;
  if (known) useSpec(known);

  for (const name of ["n", "k", "s", "p", "d", "padding-kind", "mode"]) field(name).addEventListener("input", update);
  field("play").addEventListener("click", play);
  field("step").addEventListener("click", () => { step += 1; draw(); });
  window.cnnlabPlayground = { convAxis };
  update();
})();
