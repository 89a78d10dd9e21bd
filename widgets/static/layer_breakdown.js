// LayerBreakdown: one bar per layer (diverging around zero), grouped lower / middle / upper,
// each group with its total. Traits: title, layers, values (float64 bytes), groups (one
// name per layer; "" for none), percent (show values as percentages).

function render({ model, el }) {
  el.classList.add("ik", "ik-layers");
  const draw = () => {
    const layers = model.get("layers") || [];
    const values = f64(model.get("values"));
    const groups = model.get("groups") || [];
    const show = model.get("percent") ? pct : fmt;
    const widest = maxAbs(values) || 1;
    const children = [];
    if (model.get("title")) children.push(node("div", "ik-title", model.get("title")));
    if (!layers.length) {
      el.replaceChildren(...children, note(model.get("message") || "No layers to show."));
      return;
    }
    const grid = node("div", "ik-bars");
    let current = null;
    layers.forEach((name, k) => {
      const group = groups[k] || "";
      if (group !== current) {
        current = group;
        let total = 0;
        layers.forEach((_, j) => {
          if ((groups[j] || "") === group) total += values[j];
        });
        if (group) grid.append(node("div", "ik-group", `${group}: ${show(total)}`));
      }
      const row = node("div", "ik-bar-row", null, { "data-layer": name });
      const track = node("div", "ik-track");
      const bar = node("div", values[k] >= 0 ? "ik-bar ik-pos" : "ik-bar ik-neg");
      bar.style.width = `${(50 * Math.abs(values[k])) / widest}%`;
      track.append(node("div", "ik-axis"), bar);
      row.append(node("span", "ik-name", name, { title: name }), track);
      row.append(node("span", "ik-num", show(values[k])));
      row.title = `${name}: ${show(values[k])}`;
      grid.append(row);
    });
    children.push(grid);
    el.replaceChildren(...children);
  };
  return redrawOn(model, ["title", "layers", "values", "groups", "percent", "message"], draw);
}

export default { render };
