// Helpers shared by every influencekit component. Python prepends this file to each
// component's module (anywidget loads each module on its own, so they cannot import it).
// Every piece of corpus or query text reaches the page through textContent, never innerHTML.

const POSITIVE = [43, 108, 176]; // blue: raises the completion's log-probability
const NEGATIVE = [197, 48, 48]; // red: lowers it
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
  "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#ad494a"];

// A DOM element with a class, attributes and text (text only ever through textContent).
function node(tag, className, text, attrs) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined && text !== null) el.textContent = String(text);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
  return el;
}

function svgNode(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
  return el;
}

// Typed arrays from a binary trait (a DataView in Jupyter and in the static page). Copied,
// because a DataView over a message buffer need not be aligned for the element size.
function typed(view, Type) {
  if (!view || !view.byteLength) return new Type(0);
  return new Type(view.buffer.slice(view.byteOffset, view.byteOffset + view.byteLength));
}
const f64 = (view) => typed(view, Float64Array);
const f32 = (view) => typed(view, Float32Array);
const i32 = (view) => typed(view, Int32Array);

// Four significant digits with a sign, like influencekit.widgets.format_score.
function fmt(value) {
  const sign = value >= 0 ? "+" : "";
  const size = Math.abs(value);
  if (value !== 0 && !(size >= 1e-4 && size < 1e7)) return sign + value.toExponential(1);
  return sign + String(Number(value.toPrecision(4)));
}

// Ten significant digits with a sign: the "exact" score of hovers and titles.
const exact = (value) => (value >= 0 ? "+" : "") + String(Number(value.toPrecision(10)));

const pct = (value) => `${(100 * value).toFixed(Math.abs(value) < 0.1 ? 1 : 0)}%`;

// Diverging colour: blue for positive, red for negative, opacity |value| / scale.
function diverging(value, scale) {
  const [r, g, b] = value >= 0 ? POSITIVE : NEGATIVE;
  const alpha = scale > 0 ? Math.min(1, Math.abs(value) / scale) : 0;
  return `rgba(${r},${g},${b},${alpha.toFixed(3)})`;
}

function maxAbs(values) {
  let top = 0;
  for (const v of values) top = Math.max(top, Math.abs(v));
  return top;
}

// Legend of a diverging scale from -scale (red) to +scale (blue).
function legend(scale, what) {
  const box = node("div", "ik-legend");
  box.append(node("span", "ik-num", fmt(-scale)), node("span", "ik-gradient"));
  box.append(node("span", "ik-num", fmt(scale)));
  box.append(node("span", "", `blue raises ${what}, red lowers it`));
  return box;
}

// One floating tooltip per component root; `show` places it beside the pointer.
function tooltip(root) {
  const tip = node("div", "ik-tip");
  tip.setAttribute("role", "tooltip");
  tip.hidden = true;
  root.append(tip);
  return {
    show(event, lines) {
      tip.replaceChildren(...lines.map((line, k) => node("div", k ? "" : "ik-tip-head", line)));
      // fixed to the viewport: notebook output areas clip what overflows them
      tip.style.left = `${Math.min(event.clientX + 12, window.innerWidth - 300)}px`;
      tip.style.top = `${event.clientY + 14}px`;
      tip.hidden = false;
    },
    hide() {
      tip.hidden = true;
    },
  };
}

// Redraw once per turn of the event loop however many traits changed together.
function redrawOn(model, keys, draw) {
  let queued = false;
  const schedule = () => {
    if (queued) return;
    queued = true;
    queueMicrotask(() => {
      queued = false;
      draw();
    });
  };
  for (const key of keys) model.on(`change:${key}`, schedule);
  draw();
  return () => {
    for (const key of keys) model.off(`change:${key}`, schedule);
  };
}

function note(text) {
  return node("p", "ik-note", text);
}
