// cnn-jax explore: the page. Draw on #pad; each change sends the pad as a PNG to /api/predict
// (one request in flight at a time, the newest drawing sent next) and draws what comes back:
// the model input, every conv/pool layer's maps, the dense layers as nodes and the softmax.
// Hovering a unit outlines the window it reads in its source layer and its receptive field in
// the input, from the geometry in /api/meta (window, stride, dilation, pad and the receptive
// field's start, jump and size per layer).
"use strict";

const MAP_PIXELS = 84;     // a feature map is drawn about this wide (whole pixels per unit)
const INPUT_PIXELS = 192;  // the model input and the image, likewise
const NODE = 14;           // pixels per dense-layer node

const state = {
  meta: null, last: null, requests: 0, inFlight: false, dirty: false,
  views: [],  // per layer: {maps: [{canvas, window, field, unit}], scale} or {nodes: canvas}
  input: null, image: null, hovered: null,
};
window.explorer = state;  // for tests and the curious

const $ = (id) => document.getElementById(id);
const pad = $("pad");
const ctx = pad.getContext("2d");

// ---------------------------------------------------------------------------------------------
// Decoding the server's arrays (base64 of little-endian float32 / uint8, row-major)

function bytes(b64) {
  const text = atob(b64);
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}
const f32 = (b64) => new Float32Array(bytes(b64).buffer);

// ---------------------------------------------------------------------------------------------
// Building the page from /api/meta

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function scaleFor(h, w, target) { return Math.max(1, Math.floor(target / Math.max(h, w))); }

// A map: a canvas of h x w pixels shown `scale` times larger, and its three outline boxes.
function mapView(h, w, scale, layerIndex, channel) {
  const box = el("div", "map");
  const canvas = el("canvas");
  canvas.width = w; canvas.height = h;
  canvas.style.width = `${w * scale}px`; canvas.style.height = `${h * scale}px`;
  canvas.dataset.layer = layerIndex; canvas.dataset.channel = channel;
  box.appendChild(canvas);
  const view = { box, canvas, scale, h, w };
  for (const kind of ["window", "field", "unit"]) {
    view[kind] = el("div", `box ${kind}`);
    box.appendChild(view[kind]);
  }
  return view;
}

function describe(layer) {
  const dims = layer.shape.join("×");
  if (layer.kind === "dense") return `dense · ${layer.shape[0]} units (before the activation)`;
  let what = `${layer.kind} · ${dims}`;
  if (layer.window) {
    what += ` · window ${layer.window.join("×")}, stride ${layer.stride.join("×")}`;
    if (layer.pad.some((p) => p > 0)) what += `, pad ${layer.pad.join("×")}`;
    if (layer.dilation.some((d) => d > 1)) what += `, dilation ${layer.dilation.join("×")}`;
  }
  if (layer.shown < layer.shape[2]) what += ` · first ${layer.shown} of ${layer.shape[2]} channels`;
  if (layer.kind === "conv") what += " · before the activation";
  return what;
}

function build(meta) {
  const net = $("network");
  const [h, w, c] = meta.input_shape;
  const [nh, nw] = meta.native_shape;
  const inputRow = el("div", "layer");
  inputRow.id = "layer-input";
  inputRow.appendChild(el("h2", "", "input"));
  inputRow.lastChild.appendChild(el("span", "what",
    `${meta.input_shape.join("×")} as the model sees it, from the ${meta.native_shape.join("×")} image`));
  const row = el("div", "maps");
  state.image = mapView(nh, nw, scaleFor(nh, nw, INPUT_PIXELS), "image", 0);
  state.input = mapView(h, w, scaleFor(h, w, INPUT_PIXELS), -1, 0);
  state.input.canvas.id = "input-map";
  row.append(state.image.box, state.input.box);
  inputRow.appendChild(row);
  net.appendChild(inputRow);

  meta.layers.forEach((layer, index) => {
    const section = el("div", "layer");
    section.id = `layer-${index}`;
    const title = el("h2", "", layer.name);
    title.appendChild(el("span", "what", describe(layer)));
    section.appendChild(title);
    if (layer.kind === "dense") {
      const holder = el("div", "nodes");
      const canvas = el("canvas");
      const perRow = Math.max(1, Math.min(layer.shape[0], 48));
      canvas.width = perRow * NODE;
      canvas.height = Math.ceil(layer.shape[0] / perRow) * NODE;
      canvas.dataset.layer = index;
      holder.appendChild(canvas);
      section.appendChild(holder);
      state.views.push({ nodes: canvas, perRow });
      canvas.addEventListener("mousemove", (e) => hoverNode(index, e));
      canvas.addEventListener("mouseleave", clearHover);
    } else {
      const [lh, lw] = layer.shape;
      const scale = scaleFor(lh, lw, MAP_PIXELS);
      const maps = el("div", "maps");
      const views = [];
      for (let ch = 0; ch < layer.shown; ch++) {
        const v = mapView(lh, lw, scale, index, ch);
        v.canvas.addEventListener("mousemove", (e) => hoverUnit(index, ch, e));
        v.canvas.addEventListener("mouseleave", clearHover);
        maps.appendChild(v.box);
        views.push(v);
      }
      section.appendChild(maps);
      state.views.push({ maps: views, scale });
    }
    net.appendChild(section);
  });

  const probs = $("probs");
  meta.class_names.forEach((name, i) => {
    const r = el("div", "prob-row");
    r.id = `prob-${i}`;
    r.append(el("span", "name", name), el("span", "track"), el("span", "pct", ""));
    r.children[1].appendChild(el("div", "bar"));
    probs.appendChild(r);
  });
  // A stroke about as wide, relative to the image, as the training images' (8x8 digits: ~1.5
  // pixels; MNIST: ~2 of 28), since the pad is shrunk to the native size.
  $("brush").value = Math.round(pad.width * (0.05 + 0.75 / Math.min(nh, nw)));
  $("model-name").textContent =
    `${meta.model} (${meta.experiment}) · ${meta.name} · ${meta.class_names.length} classes`;
}

// ---------------------------------------------------------------------------------------------
// Drawing the server's answer

function paintGrey(canvas, values, lo, hi) {  // one channel: [h * w], linear lo..hi -> 0..255
  const g = canvas.getContext("2d");
  const img = g.createImageData(canvas.width, canvas.height);
  const span = hi - lo || 1;
  for (let i = 0; i < values.length; i++) {
    const v = Math.max(0, Math.min(255, Math.round((255 * (values[i] - lo)) / span)));
    img.data[4 * i] = img.data[4 * i + 1] = img.data[4 * i + 2] = v;
    img.data[4 * i + 3] = 255;
  }
  g.putImageData(img, 0, 0);
}

function signedColour(v, scale) {  // grey for positive, blue for negative, 0 black
  const t = Math.min(1, Math.abs(v) / scale);
  return v >= 0 ? [255 * t, 255 * t, 255 * t] : [40 * t, 110 * t, 255 * t];
}

function paintSigned(canvas, data, channels, channel, scale) {
  const g = canvas.getContext("2d");
  const img = g.createImageData(canvas.width, canvas.height);
  const n = canvas.width * canvas.height;
  for (let i = 0; i < n; i++) {
    const [r, gr, b] = signedColour(data[i * channels + channel], scale);
    img.data[4 * i] = r; img.data[4 * i + 1] = gr; img.data[4 * i + 2] = b; img.data[4 * i + 3] = 255;
  }
  g.putImageData(img, 0, 0);
}

function extent(values) {  // [min, max] (a loop: spreading a large array overflows the stack)
  let lo = Infinity, hi = -Infinity;
  for (const v of values) { if (v < lo) lo = v; if (v > hi) hi = v; }
  return [lo, hi];
}

function paintRGB(canvas, values) {  // [h * w * 3], each channel stretched to 0..255
  const g = canvas.getContext("2d");
  const img = g.createImageData(canvas.width, canvas.height);
  for (let c = 0; c < 3; c++) {
    const v = channelOf(values, 3, c);
    const [lo, hi] = extent(v), span = hi - lo || 1;
    for (let i = 0; i < v.length; i++) img.data[4 * i + c] = Math.round((255 * (v[i] - lo)) / span);
  }
  for (let i = 3; i < img.data.length; i += 4) img.data[i] = 255;
  g.putImageData(img, 0, 0);
}

function channelOf(data, channels, channel) {
  const out = new Float32Array(data.length / channels);
  for (let i = 0; i < out.length; i++) out[i] = data[i * channels + channel];
  return out;
}

function render(resp) {
  const meta = state.meta;
  // the image (uint8, native shape) and the model input (float32, normalised)
  const image = bytes(resp.image), x = f32(resp.input);
  if (meta.native_shape[2] === 3) {
    paintRGB(state.image.canvas, image);
    paintRGB(state.input.canvas, x);
  } else {
    paintGrey(state.image.canvas, channelOf(image, meta.native_shape[2], 0), 0, 255);
    const xc = channelOf(x, meta.input_shape[2], 0);
    paintGrey(state.input.canvas, xc, ...extent(xc));
  }
  resp.values = [];
  meta.layers.forEach((layer, index) => {
    const data = f32(resp.maps[index]);
    resp.values.push(data);
    let scale = 0;
    for (const v of data) scale = Math.max(scale, Math.abs(v));
    scale = scale || 1;
    const view = state.views[index];
    if (layer.kind === "dense") {
      const g = view.nodes.getContext("2d");
      g.clearRect(0, 0, view.nodes.width, view.nodes.height);
      data.forEach((v, i) => {
        const [r, gr, b] = signedColour(v, scale);
        g.fillStyle = `rgb(${r},${gr},${b})`;
        g.beginPath();
        g.arc((i % view.perRow) * NODE + NODE / 2, Math.floor(i / view.perRow) * NODE + NODE / 2,
              NODE / 2 - 1.5, 0, 2 * Math.PI);
        g.fill();
        g.strokeStyle = "#555"; g.lineWidth = 1; g.stroke();
      });
    } else {
      view.maps.forEach((v, ch) => paintSigned(v.canvas, data, layer.shown, ch, scale));
    }
  });
  resp.probs.forEach((p, i) => {
    const row = $(`prob-${i}`);
    row.classList.toggle("best", i === resp.predicted);
    row.querySelector(".bar").style.width = `${(100 * p).toFixed(1)}%`;
    row.querySelector(".pct").textContent = `${(100 * p).toFixed(1)}%`;
  });
  $("predicted-class").textContent = resp.class_name;
  $("predicted-prob").textContent = `${(100 * resp.probs[resp.predicted]).toFixed(1)}%`;
  document.body.dataset.predicted = resp.predicted;
  if (state.hovered) state.hovered.refresh();
}

// ---------------------------------------------------------------------------------------------
// Talking to the server

async function post(body, contentType) {
  const start = performance.now();
  const reply = await fetch("api/predict", {
    method: "POST", body, headers: { "Content-Type": contentType },
  });
  const data = await reply.json();
  if (!reply.ok) throw new Error(data.error || `HTTP ${reply.status}`);
  data.roundTrip = performance.now() - start;
  return data;
}

function showStatus(text, error) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", !!error);
  document.body.dataset.error = error ? text : "";
}

function settled(resp) {
  state.requests += 1;
  document.body.dataset.requests = state.requests;
  if (resp) {
    state.last = resp;
    render(resp);
    const ms = resp.ms;
    showStatus(`model ${ms.model.toFixed(1)} ms · decode ${ms.decode.toFixed(1)} ms · ` +
               `round trip ${resp.roundTrip.toFixed(1)} ms` +
               (resp.inverted ? " · the image was inverted to match the training images" : ""));
  }
}

function padBlob() { return new Promise((done) => pad.toBlob(done, "image/png")); }

async function sendPad() {  // one request at a time; a drawing made meanwhile goes next
  if (state.inFlight) { state.dirty = true; busy(); return; }
  state.inFlight = true; state.dirty = false; busy();
  let resp = null;
  try {
    resp = await post(await padBlob(), "image/png");
  } catch (err) {
    showStatus(String(err.message || err), true);
  }
  state.inFlight = false;
  settled(resp);
  if (state.dirty) sendPad(); else busy();
}

function busy() { document.body.dataset.busy = state.inFlight || state.dirty ? "1" : "0"; }

async function sendFile(file) {
  state.inFlight = true; busy();
  let resp = null;
  try {
    // an unknown type is still sent as an image (application/octet-stream means raw pixels)
    resp = await post(file, file.type || "image/x-unknown");
    paintImageOnPad(resp);
  } catch (err) {
    showStatus(`${file.name}: ${err.message || err}`, true);
  }
  state.inFlight = false;
  settled(resp);
  if (state.dirty) sendPad(); else busy();
}

// ---------------------------------------------------------------------------------------------
// The drawing pad

const ink = () => (state.meta && state.meta.background === "light" ? "#000" : "#fff");
const paper = () => (state.meta && state.meta.background === "light" ? "#fff" : "#000");

function clearPad() {
  ctx.fillStyle = paper();
  ctx.fillRect(0, 0, pad.width, pad.height);
}

function paintImageOnPad(resp) {  // a dropped image, as the model got it, to draw over
  const [h, w, c] = state.meta.native_shape;
  const small = document.createElement("canvas");
  small.width = w; small.height = h;
  const g = small.getContext("2d");
  const img = g.createImageData(w, h);
  const px = bytes(resp.image);
  for (let i = 0; i < h * w; i++) {
    const rgb = c === 3 ? [px[3 * i], px[3 * i + 1], px[3 * i + 2]] : [px[i], px[i], px[i]];
    img.data.set([...rgb, 255], 4 * i);
  }
  g.putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, pad.width, pad.height);
}

let last = null;
function padPoint(e) {
  const r = pad.getBoundingClientRect();
  return [((e.clientX - r.left) * pad.width) / r.width, ((e.clientY - r.top) * pad.height) / r.height];
}
function stroke(from, to) {
  ctx.strokeStyle = ink(); ctx.fillStyle = ink();
  ctx.lineWidth = Number($("brush").value); ctx.lineCap = "round"; ctx.lineJoin = "round";
  ctx.beginPath(); ctx.moveTo(...from); ctx.lineTo(...to); ctx.stroke();
}
pad.addEventListener("pointerdown", (e) => {
  pad.setPointerCapture(e.pointerId);
  last = padPoint(e);
  stroke(last, last);
  sendPad();
});
pad.addEventListener("pointermove", (e) => {
  if (!last) return;
  const p = padPoint(e);
  stroke(last, p);
  last = p;
  sendPad();
});
const penUp = () => { if (last) { last = null; sendPad(); } };
pad.addEventListener("pointerup", penUp);
pad.addEventListener("pointercancel", penUp);
$("clear").addEventListener("click", () => { clearPad(); sendPad(); });

const wrap = $("pad-wrap");
wrap.addEventListener("dragover", (e) => { e.preventDefault(); wrap.classList.add("dragover"); });
wrap.addEventListener("dragleave", () => wrap.classList.remove("dragover"));
wrap.addEventListener("drop", (e) => {
  e.preventDefault();
  wrap.classList.remove("dragover");
  const file = e.dataTransfer.files[0];
  if (file) sendFile(file);
});

// ---------------------------------------------------------------------------------------------
// Hovering: a unit's window in its source layer and its receptive field in the input

function placeBox(box, view, rows, cols) {  // rows, cols: inclusive [first, last] units
  if (!rows) { box.style.display = "none"; delete box.dataset.rows; delete box.dataset.cols; return; }
  const r0 = Math.max(0, rows[0]), r1 = Math.min(view.h - 1, rows[1]);
  const c0 = Math.max(0, cols[0]), c1 = Math.min(view.w - 1, cols[1]);
  if (r0 > r1 || c0 > c1) { box.style.display = "none"; return; }  // all in the padding
  const s = view.scale;
  Object.assign(box.style, {
    display: "block", left: `${c0 * s - 2}px`, top: `${r0 * s - 2}px`,
    width: `${(c1 - c0 + 1) * s + 4}px`, height: `${(r1 - r0 + 1) * s + 4}px`,
  });
  box.dataset.rows = `${r0},${r1}`;
  box.dataset.cols = `${c0},${c1}`;
}

// The rows (or cols) of `layer`'s source that units first..last of `layer` read, per dim d.
function back(layer, range, d) {
  const s = layer.stride[d], p = layer.pad[d], k = (layer.window[d] - 1) * layer.dilation[d];
  return [range[0] * s - p, range[1] * s - p + k];
}

function allBoxes() {
  const views = [state.input, state.image];
  for (const v of state.views) if (v.maps) views.push(...v.maps);
  return views;
}

function clearHover() {
  state.hovered = null;
  for (const v of allBoxes()) for (const k of ["window", "field", "unit"]) placeBox(v[k], v, null);
  $("hover-info").textContent = "";
}

function hoverUnit(index, channel, e) {
  const view = state.views[index].maps[channel];
  const r = view.canvas.getBoundingClientRect();
  const i = Math.min(view.h - 1, Math.floor((e.clientY - r.top) / view.scale));
  const j = Math.min(view.w - 1, Math.floor((e.clientX - r.left) / view.scale));
  showUnit(index, channel, i, j);
}

function showUnit(index, channel, i, j) {
  clearHover();
  const meta = state.meta;
  const layer = meta.layers[index];
  const view = state.views[index].maps[channel];
  placeBox(view.unit, view, [i, i], [j, j]);
  const value = state.last ? state.last.values[index][(i * layer.shape[1] + j) * layer.shown + channel] : NaN;
  const lines = [`${layer.name} channel ${channel}, unit (${i}, ${j}): ${value.toFixed(3)}`];
  if (layer.window && layer.source !== null) {
    const rows = back(layer, [i, i], 0), cols = back(layer, [j, j], 1);
    const source = layer.source === -1 ? null : meta.layers[layer.source];
    const targets = layer.source === -1 ? [state.input]
      : state.views[layer.source].maps.filter((_, ch) => layer.kind === "conv" || ch === channel);
    for (const t of targets) placeBox(t.window, t, rows, cols);
    lines.push(`reads ${source ? source.name : "the input"} rows ${rows[0]}–${rows[1]}, ` +
               `cols ${cols[0]}–${cols[1]}` + (layer.kind === "conv" ? " (every channel)" : ""));
  }
  if (layer.rf_size) {  // the window composed back to the input (server-side: /api/meta)
    const fr = [layer.rf_start[0] + i * layer.rf_jump[0], 0];
    const fc = [layer.rf_start[1] + j * layer.rf_jump[1], 0];
    fr[1] = fr[0] + layer.rf_size[0] - 1;
    fc[1] = fc[0] + layer.rf_size[1] - 1;
    placeBox(state.input.field, state.input, fr, fc);
    lines.push(`receptive field in the input: rows ${fr[0]}–${fr[1]}, cols ${fc[0]}–${fc[1]} ` +
               `(${layer.rf_size.join("×")}; outlined where it lies inside the image)`);
  }
  $("hover-info").textContent = lines.join("\n");
  state.hovered = { index, channel, i, j, refresh: () => showUnit(index, channel, i, j) };
}

function hoverNode(index, e) {
  const view = state.views[index];
  const r = view.nodes.getBoundingClientRect();
  const k = Math.floor((e.clientY - r.top) / NODE) * view.perRow + Math.floor((e.clientX - r.left) / NODE);
  const layer = state.meta.layers[index];
  if (k < 0 || k >= layer.shape[0] || !state.last) return;
  clearHover();
  const name = index === state.meta.layers.length - 1 && state.meta.class_names[k] !== undefined
    ? ` (class ${state.meta.class_names[k]})` : "";
  $("hover-info").textContent = `${layer.name} unit ${k}${name}: ${state.last.values[index][k].toFixed(3)}`;
}

// ---------------------------------------------------------------------------------------------
// Start

fetch("api/meta").then((r) => r.json()).then((meta) => {
  state.meta = meta;
  build(meta);
  clearPad();
  sendPad();
}).catch((err) => showStatus(`could not load the model description: ${err}`, true));
