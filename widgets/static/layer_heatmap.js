// LayerHeatmap: layers (rows) × columns (e.g. a query's top sequences), each cell coloured
// by its signed value on one symmetric scale. Clicking a column sets `selected`.
// Traits: title, layers, groups, columns (labels), values (float64 bytes, row-major
// layers × columns), selected (column index or -1).

function render({ model, el }) {
  el.classList.add("ik", "ik-matrix");
  const draw = () => {
    const layers = model.get("layers") || [];
    const columns = model.get("columns") || [];
    const values = f64(model.get("values"));
    const groups = model.get("groups") || [];
    const selected = model.get("selected");
    const children = [];
    if (model.get("title")) children.push(node("div", "ik-title", model.get("title")));
    if (!layers.length || !columns.length) {
      el.replaceChildren(...children, note(model.get("message") || "Nothing to show."));
      return;
    }
    const scale = maxAbs(values) || 1;
    children.push(legend(scale, "the completion's log-probability"));
    const table = node("table", "ik-heat");
    const head = node("tr");
    head.append(node("th", "", "layer"));
    columns.forEach((label, c) => {
      const th = node("th", c === selected ? "ik-col ik-selected" : "ik-col", c + 1, {
        "data-column": c,
        title: label,
      });
      head.append(th);
    });
    table.append(head);
    layers.forEach((name, r) => {
      const row = node("tr", groups[r] && groups[r] !== groups[r - 1] ? "ik-group-start" : "");
      row.append(node("th", "ik-name", name, { title: `${name} (${groups[r] || "no group"})` }));
      columns.forEach((label, c) => {
        const value = values[r * columns.length + c];
        const cell = node("td", c === selected ? "ik-selected" : "", null, {
          "data-column": c,
          title: `${name} × ${label}: ${fmt(value)}`,
        });
        cell.style.background = diverging(value, scale);
        row.append(cell);
      });
      table.append(row);
    });
    table.addEventListener("click", (event) => {
      const cell = event.target.closest("[data-column]");
      if (!cell) return;
      model.set("selected", Number(cell.dataset.column));
      model.save_changes();
    });
    children.push(table);
    el.replaceChildren(...children);
  };
  return redrawOn(
    model,
    ["title", "layers", "groups", "columns", "values", "selected", "message"],
    draw,
  );
}

export default { render };
