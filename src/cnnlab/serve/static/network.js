// The network view: every layer of the served model as a column of its feature maps for the
// current input (GET /network/spec once, POST /network per drawing), one colour scale per layer.
// Click a cell: its receptive field is outlined on the input and on every earlier layer, and the
// panel redoes that value's arithmetic from the model's own numbers (kernel slice × input patch
// per input channel, the sum, the bias, then batchnorm / activation as the model has them).
// The offline copy (`cnnlab explorer`) runs this same file on numbers baked into the page.
"use strict";

(function () {
  const root = document.getElementById("network");
  if (!root) return;
  const columns = document.getElementById("net-columns");
  const panel = document.getElementById("cell-panel");
  const note = document.getElementById("net-status");
  const offline = window.CNNLAB_OFFLINE || null;
  const ELEMENTWISE = new Set(["batchnorm", "relu", "leaky_relu", "gelu", "silu", "elu", "tanh", "sigmoid", "dropout", "scale"]);
  const ACTIVATIONS = {
    relu: (x) => Math.max(0, x),
    leaky_relu: (x, p) => (x >= 0 ? x : (p.negative_slope ?? 0.01) * x),
    gelu: (x) => 0.5 * x * (1 + erf(x / Math.SQRT2)),
    silu: (x) => x / (1 + Math.exp(-x)),
    elu: (x, p) => (x > 0 ? x : (p.alpha ?? 1) * (Math.exp(x) - 1)),
    tanh: (x) => Math.tanh(x),
    sigmoid: (x) => 1 / (1 + Math.exp(-x)),
  };

  let spec = null;
  let nodes = new Map();      // id -> node
  let views = new Map();      // id -> {column, maps: [div.map], scale}
  let values = new Map();     // id -> {data: Float32Array, low, high, colour}
  let result = null;
  let selection = null;       // {id, channel, row, col}
  let inFlight = false, pending = null, generation = 0;
  const timings = [];         // (ms) request sent -> view drawn, read by benchmarks/explorer.py
  const renderTimings = [];   // (ms) answer in hand -> view drawn

  // ---- numbers ---------------------------------------------------------------------------------
  function decode(packed) {
    const bytes = atob(packed.b64);
    const buffer = new ArrayBuffer(bytes.length);
    const view = new Uint8Array(buffer);
    for (let i = 0; i < bytes.length; i++) view[i] = bytes.charCodeAt(i);
    return new Float32Array(buffer);  // little-endian, as every browser's typed arrays are
  }

  function erf(x) {  // Abramowitz & Stegun 7.1.26 (error < 1.5e-7): GELU only
    const sign = x < 0 ? -1 : 1;
    const t = 1 / (1 + 0.3275911 * Math.abs(x));
    const y = 1 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * Math.exp(-x * x);
    return sign * y;
  }

  function fmt(x) {
    if (!Number.isFinite(x)) return String(x);
    if (x === 0) return "0";
    const a = Math.abs(x);
    return a >= 1000 || a < 0.001 ? x.toExponential(2) : x.toPrecision(4).replace(/\.?0+$/, "");
  }

  function plus(x) {  // "+ 0.5" / "− 0.5": a term added in a written-out sum
    return x < 0 ? `− ${fmt(-x)}` : `+ ${fmt(x)}`;
  }

  function at(id, c, r, q) {
    const v = values.get(id);
    const [, h, w] = nodes.get(id).shape;
    return v.data[(c * h + r) * w + q];
  }

  // ---- building the columns (once per model) ----------------------------------------------------
  function cellScale(h, w) {
    // small maps enlarged with crisp pixels, big ones kept within the column
    return Math.max(2, Math.min(8, Math.floor(112 / Math.max(h, w))));
  }

  function element(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function buildColumns() {
    if (watcher) watcher.disconnect();
    columns.replaceChildren();
    views = new Map();
    for (const node of spec.nodes) {
      const [c, h, w] = node.shape;
      const scale = cellScale(h, w);
      const column = element("div", `net-column role-${node.role || "main"}`);
      column.dataset.node = node.id;
      const title = element("div", "net-title");
      const label = node.role === "shortcut" ? "shortcut: " : node.role === "add" ? "add: " : "";
      if (node.id === "input") title.append(element("b", "", "input"), " (normalised as in training)");
      else title.append(element("b", "", node.path), " ", label + node.row.layer);
      const formula = element("div", "net-formula", node.row["output size formula"] || "");
      const facts = element("div", "net-facts",
        `→ ${node.shape.join("×")} · RF ${node.receptive_field.join("×")} · jump ${node.jump[0]}` +
        (node.id === "input" ? "" : ` · cell 0's field starts at ${node.start[0]}`));
      facts.title = "receptive field (RF): the input pixels one value sees; jump: input pixels between neighbouring " +
        "values; cell 0's field starts this many pixels before the input (negative: in the padding)";
      const legend = element("div", "net-legend");
      legend.innerHTML = '<canvas width="128" height="1"></canvas><span class="low"></span><span class="high"></span>';
      const maps = element("div", "net-maps");
      const list = [];
      for (let k = 0; k < c; k++) {
        const holder = element("div", "map");
        holder.dataset.node = node.id;
        holder.dataset.channel = k;
        const canvas = document.createElement("canvas");
        canvas.width = w;
        canvas.height = h;
        canvas.style.width = `${w * scale}px`;
        canvas.style.height = `${h * scale}px`;
        canvas.title = `${node.id === "input" ? "input" : "layer " + node.path} channel ${k + 1}`;
        holder.append(canvas);
        holder.stale = true;
        if (watcher) watcher.observe(holder);
        maps.append(holder);
        list.push(holder);
      }
      column.append(title, formula, facts, legend, maps);
      columns.append(column);
      views.set(node.id, { column, maps: list, scale, legend });
    }
    const head = element("div", "net-column net-head");
    head.id = "net-head";
    columns.append(head);
  }

  // ---- drawing the numbers ------------------------------------------------------------------------
  function drawLegend(view, entry) {
    const canvas = view.legend.querySelector("canvas");
    const context = canvas.getContext("2d");
    const image = context.createImageData(128, 1);
    const table = spec.colour_maps[entry.colour];
    for (let x = 0; x < 128; x++) {
      const [r, g, b] = table[Math.round(x * 255 / 127)];
      image.data.set([r, g, b, 255], 4 * x);
    }
    context.putImageData(image, 0, 0);
    view.legend.querySelector(".low").textContent = fmt(entry.low);
    view.legend.querySelector(".high").textContent = fmt(entry.high);
    view.legend.title = `${entry.colour}: ${fmt(entry.low)} … ${fmt(entry.high)} (one scale for every channel of this layer)`;
  }

  const lookups = new Map();  // colour map name -> 256 RGBA pixels as Uint32 (one store per pixel)
  function lookup(name) {
    if (!lookups.has(name)) {
      const table = new Uint32Array(256);
      const bytes = new Uint8Array(table.buffer);
      spec.colour_maps[name].forEach(([r, g, b], i) => bytes.set([r, g, b, 255], 4 * i));
      lookups.set(name, table);
    }
    return lookups.get(name);
  }

  function drawChannel(holder) {
    const entry = values.get(holder.dataset.node);
    holder.stale = false;
    if (!entry) return;
    const [, h, w] = nodes.get(holder.dataset.node).shape;
    const canvas = holder.firstChild;
    const context = canvas.getContext("2d");
    const image = context.createImageData(w, h);
    const pixels = new Uint32Array(image.data.buffer);
    const table = lookup(entry.colour);
    const factor = 255 / (entry.high - entry.low || 1);
    const base = Number(holder.dataset.channel) * h * w;
    for (let p = 0; p < h * w; p++) {
      const level = ((entry.data[base + p] - entry.low) * factor + 0.5) | 0;
      pixels[p] = table[level < 0 ? 0 : level > 255 ? 255 : level];
    }
    context.putImageData(image, 0, 0);
  }

  // Only the maps in view are drawn at once; the others when they are scrolled to (a colour
  // model has hundreds of channels, and a stroke should not wait for the ones nobody sees).
  const watcher = "IntersectionObserver" in window ? new IntersectionObserver((entries) => {
    for (const entry of entries) {
      entry.target.visible = entry.isIntersecting;
      if (entry.isIntersecting && entry.target.stale) drawChannel(entry.target);
    }
  }, { rootMargin: "150px" }) : null;

  function drawMaps(id) {
    const view = views.get(id);
    for (const holder of view.maps) {
      if (!watcher || holder.visible) drawChannel(holder);
      else holder.stale = true;
    }
    drawLegend(view, values.get(id));
  }

  function drawHead() {
    const head = document.getElementById("net-head");
    const out = result.head;
    head.replaceChildren(element("div", "net-title", "head"));
    for (const [n, layer] of spec.head.entries()) {
      const row = element("div", "net-formula");
      row.append(element("b", "", `${layer.path} `), `${layer.row.layer} · `, element("span", "", layer.row["output size formula"] || `→ ${layer.shape.join("×")}`));
      head.append(row);
      if (n === 0) head.append(element("div", "net-facts", `flatten: ${out.flattened.toLocaleString()} numbers go into the classifier`));
    }
    const table = element("table", "net-probabilities");
    table.innerHTML = "<thead><tr><th>class</th><th>logit</th><th>softmax</th><th></th></tr></thead>";
    const body = element("tbody");
    spec.classes.forEach((name, i) => {
      const tr = element("tr", i === out.predicted ? "predicted" : "");
      const bar = element("span", "bar-fill");
      bar.style.width = `${Math.max(0.5, 100 * out.probabilities[i])}%`;
      const track = element("td", "track");
      track.append(bar);
      tr.append(element("td", "", name), element("td", "num", fmt(out.logits[i])),
        element("td", "num", `${(100 * out.probabilities[i]).toFixed(2)}%`), track);
      body.append(tr);
    });
    table.append(body);
    head.append(table, element("p", "note", `${spec.softmax_note}; predicted: ${out.label}`));
    head.dataset.predicted = out.label;
  }

  function show(answer) {
    const started = performance.now();
    result = answer;
    values = new Map();
    for (const entry of answer.maps) {
      values.set(entry.id, { data: decode(entry.values), low: entry.low, high: entry.high, colour: entry.colour_map });
      drawMaps(entry.id);
    }
    drawHead();
    root.dataset.ready = "1";
    if (selection) select(selection.id, selection.channel, selection.row, selection.col);
    renderTimings.push(performance.now() - started);
    // benchmarks/explorer.py: `last` when no newer drawing waits (the answer to a stroke's end)
    document.dispatchEvent(new CustomEvent("cnnlab:network-drawn", { detail: { last: pending === null } }));
  }

  // ---- receptive fields -----------------------------------------------------------------------------
  // The region of every earlier layer one cell depends on: walk the nodes backwards, mapping each
  // region through its layer's window (rows r0..r1 come from input rows r0·s − p .. r1·s − p + d(k − 1)).
  function regions(id, row, col) {
    const found = new Map([[id, [row, row, col, col]]]);
    const order = spec.nodes.map((n) => n.id);
    for (let n = order.indexOf(id); n >= 0; n--) {
      const node = nodes.get(order[n]);
      const region = found.get(node.id);
      if (!region) continue;
      let [r0, r1, c0, c1] = region;
      if (node.window) {
        const { kernel, stride, padding, dilation } = node.window;
        r0 = r0 * stride[0] - padding[0];
        r1 = r1 * stride[0] - padding[0] + dilation[0] * (kernel[0] - 1);
        c0 = c0 * stride[1] - padding[1];
        c1 = c1 * stride[1] - padding[1] + dilation[1] * (kernel[1] - 1);
      } else if (!node.known) {  // a layer the page cannot see into: everything before it may matter
        for (const input of node.inputs) {
          const [, h, w] = nodes.get(input).shape;
          found.set(input, [0, h - 1, 0, w - 1]);
        }
        continue;
      }
      for (const input of node.inputs) {
        const old = found.get(input);
        found.set(input, old ? [Math.min(old[0], r0), Math.max(old[1], r1), Math.min(old[2], c0), Math.max(old[3], c1)]
          : [r0, r1, c0, c1]);
      }
    }
    return found;
  }

  function drawBoxes() {
    for (const box of columns.querySelectorAll(".rf-box")) box.remove();
    for (const column of columns.querySelectorAll(".net-column")) {
      delete column.dataset.box;
      column.classList.remove("in-field", "selected");
    }
    if (!selection) return;
    const found = regions(selection.id, selection.row, selection.col);
    for (const [id, [r0, r1, c0, c1]] of found) {
      const view = views.get(id);
      const [, h, w] = nodes.get(id).shape;
      view.column.dataset.box = `${r0},${c0},${r1},${c1}`;  // unclipped: it may reach into the padding
      view.column.classList.add(id === selection.id ? "selected" : "in-field");
      const top = Math.max(0, r0), bottom = Math.min(h - 1, r1), left = Math.max(0, c0), right = Math.min(w - 1, c1);
      view.maps.forEach((holder, k) => {
        if (id === selection.id && k !== selection.channel) return;
        const box = element("div", id === selection.id ? "rf-box cell" : "rf-box");
        box.style.top = `${top * view.scale}px`;
        box.style.left = `${left * view.scale}px`;
        box.style.height = `${(bottom - top + 1) * view.scale}px`;
        box.style.width = `${(right - left + 1) * view.scale}px`;
        holder.append(box);
      });
    }
  }

  // ---- one cell's arithmetic --------------------------------------------------------------------------
  function padIndex(index, size, mode) {
    if (index >= 0 && index < size) return index;
    if (mode === "zeros") return -1;
    if (mode === "replicate") return Math.min(size - 1, Math.max(0, index));
    if (mode === "circular") return ((index % size) + size) % size;
    return index < 0 ? -index : 2 * (size - 1) - index;  // reflect
  }

  function convCell(node, out, row, col) {
    const input = nodes.get(node.inputs[0]);
    const [cin, h, w] = input.shape;
    const weights = node.weights, arrays = node.arrays;
    if (!arrays.weightData) {
      arrays.weightData = decode(arrays.weight);
      arrays.biasData = arrays.bias ? decode(arrays.bias) : null;
    }
    const [cout, perGroup, kh, kw] = arrays.weight.shape;
    const { stride, padding, dilation } = node.window;
    const first = Math.floor(out / (cout / weights.groups)) * perGroup;
    const channels = [];
    let total = 0;
    for (let g = 0; g < perGroup; g++) {
      const c = first + g;
      const kernel = [], patch = [], padded = [];
      let sum = 0;
      for (let u = 0; u < kh; u++) {
        for (let v = 0; v < kw; v++) {
          const r = padIndex(row * stride[0] - padding[0] + u * dilation[0], h, weights.padding_mode);
          const q = padIndex(col * stride[1] - padding[1] + v * dilation[1], w, weights.padding_mode);
          const inside = r >= 0 && q >= 0;
          const x = inside ? at(input.id, c, r, q) : 0;
          const k = arrays.weightData[((out * perGroup + g) * kh + u) * kw + v];
          kernel.push(k);
          patch.push(x);
          padded.push(row * stride[0] - padding[0] + u * dilation[0] < 0 || row * stride[0] - padding[0] + u * dilation[0] >= h ||
            col * stride[1] - padding[1] + v * dilation[1] < 0 || col * stride[1] - padding[1] + v * dilation[1] >= w);
          sum += k * x;
        }
      }
      total += sum;
      channels.push({ channel: c, kernel, patch, padded, sum, kh, kw });
    }
    const bias = arrays.biasData ? arrays.biasData[out] : 0;
    return { kind: "conv", channels, sum: total, bias, value: total + bias, hasBias: !!arrays.biasData };
  }

  function poolCell(node, channel, row, col) {
    const input = nodes.get(node.inputs[0]);
    const [, h, w] = input.shape;
    const { kernel, stride, padding, dilation } = node.window;
    const window = [];
    let best = -Infinity, sum = 0, count = 0;
    for (let u = 0; u < kernel[0]; u++) {
      for (let v = 0; v < kernel[1]; v++) {
        const r = row * stride[0] - padding[0] + u * dilation[0];
        const q = col * stride[1] - padding[1] + v * dilation[1];
        const inside = r >= 0 && r < h && q >= 0 && q < w;
        const x = inside ? at(input.id, channel, r, q) : null;
        window.push(x);
        if (inside) { best = Math.max(best, x); sum += x; count++; }
      }
    }
    if (node.type === "maxpool") return { kind: "maxpool", window, kh: kernel[0], kw: kernel[1], value: best };
    // PyTorch's divisor: the window clipped to the padded input, or to the input without count_include_pad
    const rows = Math.min(row * stride[0] - padding[0] + kernel[0], h + padding[0]) - (row * stride[0] - padding[0]);
    const cols = Math.min(col * stride[1] - padding[1] + kernel[1], w + padding[1]) - (col * stride[1] - padding[1]);
    const divisor = node.weights.count_include_pad ? rows * cols : count;
    return { kind: "avgpool", window, kh: kernel[0], kw: kernel[1], sum, divisor, value: sum / divisor };
  }

  function elementwise(node, channel, x) {
    const weights = node.weights, arrays = node.arrays;
    if (node.type === "batchnorm") {
      for (const key of ["mean", "var", "gamma", "beta"]) if (!arrays[key + "Data"]) arrays[key + "Data"] = decode(arrays[key]);
      const mean = arrays.meanData[channel], variance = arrays.varData[channel];
      const gamma = arrays.gammaData[channel], beta = arrays.betaData[channel];
      const value = (x - mean) / Math.sqrt(variance + weights.eps) * gamma + beta;
      return { text: `(${fmt(x)} − ${fmt(mean)}) / √(${fmt(variance)} + ${weights.eps}) × ${fmt(gamma)} ${plus(beta)}`, value };
    }
    if (node.type === "dropout") return { text: `${fmt(x)} (dropout does nothing at inference)`, value: x };
    if (node.type === "scale") return { text: `${fmt(x)} × ${weights.factor}`, value: x * weights.factor };
    const value = ACTIVATIONS[node.type](x, weights);
    return { text: `${node.type}(${fmt(x)})`, value };
  }

  function baseCell(node, channel, row, col) {
    if (node.type === "conv" && node.known) return convCell(node, channel, row, col);
    if ((node.type === "maxpool" || node.type === "avgpool") && node.known) return poolCell(node, channel, row, col);
    if (node.type === "add") {
      const body = at(node.inputs[0], channel, row, col), side = at(node.inputs[1], channel, row, col);
      const sum = body + side;
      const act = node.activation === "none" ? null : ACTIVATIONS[node.activation];
      return { kind: "add", body, side, sum, activation: node.activation, value: act ? act(sum, {}) : sum };
    }
    return { kind: "stored", value: at(node.id, channel, row, col) };
  }

  function chainOf(id) {
    // Back to the layer that does the sums (conv, pool, addition), then forward through the
    // element-wise layers after it (batchnorm, activation, ...), each with its own numbers.
    const chain = [];
    let node = nodes.get(id);
    while (ELEMENTWISE.has(node.type) && node.known && node.inputs.length) {
      chain.unshift(node);
      node = nodes.get(node.inputs[0]);
    }
    return { node, chain };
  }

  async function loadArrays(id) {
    // The server sends a layer's weights when one of its cells is first clicked (offline: all baked in).
    const { node, chain } = chainOf(id);
    for (const needed of [node, ...chain]) {
      if (needed.arrays !== undefined) continue;
      const response = await fetch(`/network/weights?node=${encodeURIComponent(needed.id)}`);
      if (!response.ok) throw new Error(`weights of layer ${needed.path}: HTTP ${response.status}`);
      needed.arrays = await response.json();
    }
  }

  function computeCell(id, channel, row, col) {
    const { node, chain } = chainOf(id);
    const base = baseCell(node, channel, row, col);
    base.node = node;
    base.model = at(node.id, channel, row, col);
    const steps = [];
    let value = base.value;
    for (const step of chain) {
      const done = elementwise(step, channel, value);
      value = done.value;
      steps.push({ node: step, text: done.text, value, model: at(step.id, channel, row, col) });
    }
    return { base, steps, value, model: at(id, channel, row, col) };
  }

  // ---- the panel -----------------------------------------------------------------------------------------
  function grid(numbers, kh, kw, padded, highlight) {
    const table = element("table", "grid");
    for (let u = 0; u < kh; u++) {
      const tr = element("tr");
      for (let v = 0; v < kw; v++) {
        const n = u * kw + v;
        const x = numbers[n];
        const td = element("td", (padded && padded[n] ? "pad" : "") + (highlight === n ? " best" : ""), x === null ? "pad" : fmt(x));
        tr.append(td);
      }
      table.append(tr);
    }
    return table;
  }

  function nodeName(node) {
    return node.id === "input" ? "the input" : `layer ${node.path} (${node.row.layer})`;
  }

  function showPanel() {
    const { id, channel, row, col } = selection;
    const node = nodes.get(id);
    const cell = computeCell(id, channel, row, col);
    const base = cell.base;
    panel.replaceChildren();
    panel.hidden = false;
    panel.dataset.node = id;
    panel.dataset.channel = channel;
    panel.dataset.row = row;
    panel.dataset.col = col;
    panel.dataset.value = cell.value;
    panel.dataset.model = cell.model;
    panel.dataset.sum = base.sum ?? base.value;
    const field = regions(id, row, col).get("input");
    panel.append(element("h3", "", `${nodeName(node)}, channel ${channel + 1}, row ${row}, column ${col}`));
    if (field) {
      panel.append(element("p", "note", `receptive field on the input: rows ${field[0]}…${field[1]}, columns ${field[2]}…${field[3]} ` +
        `(${field[1] - field[0] + 1}×${field[3] - field[2] + 1}, summary: ${node.row["receptive field"]}, jump ${node.row.jump}; ` +
        `cells outside the image are padding)`));
    }
    const inputNode = base.node.inputs.length ? nodes.get(base.node.inputs[0]) : null;
    if (base.kind === "conv") {
      panel.append(element("p", "", `${nodeName(base.node)}: for each of its ${base.channels.length} input channel(s) from ${nodeName(inputNode)}, ` +
        "kernel slice × input patch, summed (padding cells greyed):"));
      const list = element("div", "cell-channels");
      for (const ch of base.channels) {
        const block = element("div", "cell-channel");
        block.append(element("div", "note", `input channel ${ch.channel + 1}`));
        const row3 = element("div", "cell-row");
        if (ch.kh * ch.kw <= 49) {
          row3.append(grid(ch.kernel, ch.kh, ch.kw), element("span", "op", "×"), grid(ch.patch, ch.kh, ch.kw, ch.padded));
        }
        row3.append(element("span", "op", `→ Σ = ${fmt(ch.sum)}`));
        block.append(row3);
        list.append(block);
      }
      panel.append(list);
      const total = element("p", "cell-total");
      total.textContent = `sum over ${base.channels.length} channel(s) = ${fmt(base.sum)}` +
        (base.hasBias ? `; bias ${plus(base.bias)} = ${fmt(base.value)}` : " (no bias)") + `  [PyTorch: ${fmt(base.model)}]`;
      panel.append(total);
    } else if (base.kind === "maxpool" || base.kind === "avgpool") {
      const best = base.kind === "maxpool" ? base.window.indexOf(base.value) : -1;
      panel.append(element("p", "", `${nodeName(base.node)}: the window of ${nodeName(inputNode)}, channel ${channel + 1}`));
      const row3 = element("div", "cell-row");
      row3.append(grid(base.window, base.kh, base.kw, base.window.map((x) => x === null), best),
        element("span", "op", base.kind === "maxpool" ? `→ max = ${fmt(base.value)}` : `→ ${fmt(base.sum)} / ${base.divisor} = ${fmt(base.value)}`));
      panel.append(row3, element("p", "cell-total", `[PyTorch: ${fmt(base.model)}]`));
    } else if (base.kind === "add") {
      panel.append(element("p", "cell-total", `body (layer ${nodes.get(base.node.inputs[0]).path}) ${fmt(base.body)} + shortcut ` +
        `(${base.node.shortcut === "identity" ? "identity: the block's input" : "layer " + nodes.get(base.node.inputs[1]).path}) ${fmt(base.side)} = ${fmt(base.sum)}` +
        (base.activation === "none" ? "" : `; ${base.activation} → ${fmt(base.value)}`) + `  [PyTorch: ${fmt(base.model)}]`));
    } else {
      panel.append(element("p", "cell-total", `value ${fmt(base.value)}`));
    }
    for (const step of cell.steps) {
      panel.append(element("p", "cell-step", `then ${nodeName(step.node)}: ${step.text} = ${fmt(step.value)}  [PyTorch: ${fmt(step.model)}]`));
    }
    const match = Math.abs(cell.value - cell.model) <= 1e-4 * Math.max(1, Math.abs(cell.model));
    const final = element("p", match ? "cell-final ok" : "cell-final off",
      `= ${fmt(cell.value)}; the model's own activation: ${fmt(cell.model)} ${match ? "✓ the same to display precision" : "✗ differs"}`);
    panel.append(final);
  }

  async function select(id, channel, row, col) {
    const chosen = { id, channel, row, col };
    selection = chosen;
    drawBoxes();
    try {
      await loadArrays(id);
    } catch (error) {
      note.textContent = `network view: ${error.message}`;
      return;
    }
    if (selection !== chosen) return;  // another cell was clicked meanwhile
    showPanel();
    document.dispatchEvent(new CustomEvent("cnnlab:cell", { detail: selection }));
  }

  columns.addEventListener("click", (event) => {
    const holder = event.target.closest(".map");
    if (!holder || !values.size) return;
    const canvas = holder.firstChild;
    const box = canvas.getBoundingClientRect();
    const [, h, w] = nodes.get(holder.dataset.node).shape;
    const row = Math.min(h - 1, Math.floor((event.clientY - box.top) * h / box.height));
    const col = Math.min(w - 1, Math.floor((event.clientX - box.left) * w / box.width));
    select(holder.dataset.node, Number(holder.dataset.channel), row, col);
  });

  // ---- getting the numbers ---------------------------------------------------------------------------------
  function useSpec(value) {
    spec = value;
    nodes = new Map(spec.nodes.map((n) => [n.id, n]));
    buildColumns();
    document.dispatchEvent(new CustomEvent("cnnlab:network-spec", { detail: spec }));  // playground.js
  }

  async function send(blob) {
    pending = { blob, generation };
    if (inFlight) return;
    while (pending) {
      const { blob: next, generation: sentFor } = pending;
      pending = null;
      inFlight = true;
      const started = performance.now();
      try {
        const form = new FormData();
        form.append("file", next, "canvas.png");
        const response = await fetch("/network", { method: "POST", body: form });
        const body = await response.json();
        if (sentFor !== generation) continue;
        if (!response.ok) {
          note.textContent = typeof body.detail === "string" ? body.detail : `HTTP ${response.status}`;
          continue;
        }
        note.textContent = "";
        show(body);
        timings.push(performance.now() - started);
      } catch (error) {
        note.textContent = `network view: ${error.message}`;
      } finally {
        inFlight = false;
      }
    }
  }

  function clear() {
    generation += 1;
    pending = null;
    selection = null;
    result = null;
    values = new Map();
    panel.hidden = true;
    delete root.dataset.ready;
    if (spec) buildColumns();
  }

  window.cnnlabNetwork = { select, regions, computeCell, timings, renderTimings, state: () => ({ spec, result, selection }), show };

  if (offline) {
    useSpec(offline.spec);
    const picker = document.getElementById("net-images");
    offline.images.forEach((image, i) => {
      const button = element("button", "secondary", image.name);
      button.type = "button";
      button.addEventListener("click", () => {
        for (const other of picker.children) other.classList.remove("active");
        button.classList.add("active");
        show(image.activations);
      });
      picker.append(button);
      if (i === 0) button.click();
    });
  } else {
    document.addEventListener("cnnlab:input", (event) => send(event.detail.blob));
    document.addEventListener("cnnlab:clear", clear);
    fetch("/network/spec").then((r) => r.json()).then(useSpec).catch((error) => {
      note.textContent = `network view unavailable (${error.message})`;
    });
  }
})();
