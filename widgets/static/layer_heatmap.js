// LayerHeatmap: layers (rows) × columns (e.g. a query's top sequences), each cell coloured
// by its signed value on one symmetric scale. Clicking a column sets `selected`.
// Traits: title, layers, groups, columns (labels), values (float64 bytes, row-major
// layers × columns), selected (column index or -1), normalize (each column on its own scale).

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
    const perColumn = model.get("normalize");
    // with `normalize`, each column on its own scale: where in the network each sequence acts
    const columnScale = columns.map((_, c) => {
      let top = 0;
      for (let r = 0; r < layers.length; r++) top = Math.max(top, Math.abs(values[r * columns.length + c]));
      return top || 1;
    });
    const toggle = node("label", "ik-toggle");
    const box = node("input", "", null, { type: "checkbox" });
    box.checked = perColumn;
    box.addEventListener("change", () => {
      model.set("normalize", box.checked);
      model.save_changes();
    });
    toggle.append(box, node("span", "", " scale each column on its own"));
    const key = perColumn
      ? node("div", "ik-legend", "Each column: blue raises the completion's log-probability, red lowers it, darkest = that column's largest |value|.")
      : legend(scale, "the completion's log-probability");
    children.push(key, toggle);
    const table = node("table", "ik-heat");
    const head = node("tr");
    head.append(node("th", "", ""), node("th", "", "layer"));
    columns.forEach((label, c) => {
      const th = node("th", c === selected ? "ik-col ik-selected" : "ik-col", c + 1, {
        "data-column": c,
        title: label,
      });
      head.append(th);
    });
    table.append(head);
    layers.forEach((name, r) => {
      const starts = r === 0 || groups[r] !== groups[r - 1];
      const row = node("tr", starts && r > 0 ? "ik-group-start" : "");
      if (starts) {
        let span = 1;
        while (r + span < layers.length && groups[r + span] === groups[r]) span++;
        row.append(node("th", "ik-grp", groups[r] || "", { rowspan: span }));
      }
      row.append(node("th", "ik-name", name, { title: `${name} (${groups[r] || "no group"})` }));
      columns.forEach((label, c) => {
        const value = values[r * columns.length + c];
        const cell = node("td", c === selected ? "ik-selected" : "", null, {
          "data-column": c,
          title: `${name} × ${label}: ${fmt(value)}`,
        });
        cell.style.background = diverging(value, perColumn ? columnScale[c] : scale);
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
    ["title", "layers", "groups", "columns", "values", "selected", "normalize", "message"],
    draw,
  );
}

export default { render };
