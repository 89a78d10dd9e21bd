// ThemeClusters: clusters of training sequences with their titles, terms, sizes, influence
// shares and a representative member; the selected cluster's members; and a 2-D map of the
// sequences coloured by cluster (hover a point for its text). Traits: title, names, terms
// (list of lists), sizes (int32 bytes), shares (float64 bytes), points (float32 bytes, x y
// per sequence), assignment (int32 bytes), snippets, representatives (a snippet number per
// cluster, or none), weights (float64 bytes: influence on the query, used to order
// members), highlight (uint8 bytes, 1 = in the query's top list), selected, caption (a
// line under the map: how k was chosen).

const SIZE = 360; // the map's side in SVG units

function render({ model, el }) {
  el.classList.add("ik", "ik-themes");
  const choose = (c) => {
    model.set("selected", c);
    model.save_changes();
  };
  const draw = () => {
    const names = model.get("names") || [];
    const terms = model.get("terms") || [];
    const sizes = i32(model.get("sizes"));
    const shares = f64(model.get("shares"));
    const points = f32(model.get("points"));
    const assignment = i32(model.get("assignment"));
    const snippets = model.get("snippets") || [];
    const representatives = model.get("representatives") || [];
    const weights = f64(model.get("weights"));
    const highlight = typed(model.get("highlight"), Uint8Array);
    const selected = model.get("selected");
    const children = [];
    if (model.get("title")) children.push(node("div", "ik-title", model.get("title")));
    if (!names.length) {
      el.replaceChildren(...children, note(model.get("message") || "No clusters."));
      return;
    }
    const body = node("div", "ik-themes-body");
    const side = node("div", "ik-clusters");
    names.forEach((name, c) => {
      const card = node("div", c === selected ? "ik-cluster ik-selected" : "ik-cluster", null, {
        "data-cluster": c,
        tabindex: 0,
      });
      const head = node("div", "ik-cluster-head");
      const chip = node("span", "ik-chip", c);
      chip.style.background = PALETTE[c % PALETTE.length];
      head.append(chip, node("b", "", name), node("span", "ik-num", `n=${sizes[c]}`));
      const share = Number.isNaN(shares[c]) ? "–" : pct(shares[c]);
      head.append(node("span", "ik-num", share, { title: "share of the query's positive influence" }));
      const bar = node("div", "ik-share");
      bar.style.width = `${Math.max(0, Math.min(1, shares[c] || 0)) * 100}%`;
      bar.style.background = PALETTE[c % PALETTE.length];
      card.append(head, bar, node("div", "ik-terms", (terms[c] || []).join(", ")));
      if (representatives.length) card.append(node("div", "ik-rep", snippets[representatives[c]]));
      side.append(card);
    });
    side.addEventListener("click", (event) => {
      const card = event.target.closest("[data-cluster]");
      if (card) choose(Number(card.dataset.cluster) === selected ? -1 : Number(card.dataset.cluster));
    });
    body.append(side, drawMap(points, assignment, snippets, highlight, selected));
    children.push(body);
    if (model.get("caption")) children.push(node("p", "ik-note ik-caption", model.get("caption")));
    if (selected >= 0 && selected < names.length) {
      const members = [];
      assignment.forEach((c, i) => c === selected && members.push(i));
      members.sort((a, b) => (weights[b] || 0) - (weights[a] || 0));
      const list = node("ol", "ik-members");
      for (const i of members) {
        const item = node("li", "", snippets[i], { "data-point": i });
        if (shown(weights, highlight, i)) item.prepend(node("span", "ik-num", `${fmt(weights[i])} `));
        list.append(item);
      }
      children.push(node("div", "ik-subtitle", `Members of ${names[selected]}`), list);
    } else {
      children.push(note("Click a cluster to list its members."));
    }
    el.replaceChildren(...children);
    const tip = tooltip(el);
    const map = el.querySelector(".ik-map");
    map.addEventListener("mousemove", (event) => {
      const dot = event.target.closest("circle");
      if (!dot) return tip.hide();
      const i = Number(dot.dataset.point);
      const score = shown(weights, highlight, i) ? `  score ${fmt(weights[i])}` : "";
      tip.show(event, [snippets[i], `${names[assignment[i]]}${score}`]);
    });
    map.addEventListener("mouseleave", () => tip.hide());
    map.addEventListener("click", (event) => {
      const dot = event.target.closest("circle");
      if (dot) choose(assignment[Number(dot.dataset.point)]);
    });
  };
  return redrawOn(
    model,
    ["title", "names", "terms", "sizes", "shares", "points", "assignment", "snippets",
      "representatives", "weights", "highlight", "selected", "message", "caption"],
    draw,
  );
}

// A sequence's weight is shown when there are weights and it is highlighted (or none are).
const shown = (weights, highlight, i) => weights.length > 0 && (!highlight.length || highlight[i] > 0);

// The 2-D map as SVG: one circle per sequence, scaled to fit, with its text as <title>.
function drawMap(points, assignment, snippets, highlight, selected) {
  const n = assignment.length;
  const svg = svgNode("svg", { class: "ik-map", viewBox: `0 0 ${SIZE} ${SIZE}`, role: "img" });
  svg.append(svgNode("rect", { width: SIZE, height: SIZE, class: "ik-map-bg" }));
  let [x0, x1, y0, y1] = [Infinity, -Infinity, Infinity, -Infinity];
  for (let i = 0; i < n; i++) {
    x0 = Math.min(x0, points[2 * i]);
    x1 = Math.max(x1, points[2 * i]);
    y0 = Math.min(y0, points[2 * i + 1]);
    y1 = Math.max(y1, points[2 * i + 1]);
  }
  const pad = 14;
  const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (SIZE - 2 * pad);
  const sy = (y) => SIZE - pad - ((y - y0) / (y1 - y0 || 1)) * (SIZE - 2 * pad);
  // highlighted points last, so they are drawn on top
  const order = [...Array(n).keys()].sort((a, b) => (highlight[a] || 0) - (highlight[b] || 0));
  for (const i of order) {
    const c = assignment[i];
    const dim = selected >= 0 && c !== selected;
    const dot = svgNode("circle", {
      cx: sx(points[2 * i]).toFixed(1),
      cy: sy(points[2 * i + 1]).toFixed(1),
      r: highlight[i] ? 5 : 3,
      fill: PALETTE[c % PALETTE.length],
      "fill-opacity": dim ? 0.15 : 0.85,
      class: highlight[i] ? "ik-top" : "",
      "data-point": i,
    });
    const title = svgNode("title");
    title.textContent = snippets[i] || "";
    dot.append(title);
    svg.append(dot);
  }
  return svg;
}

export default { render };
