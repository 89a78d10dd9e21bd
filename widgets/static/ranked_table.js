// RankedTable: a query's most influential training sequences; click (or arrow keys) to
// select one. Traits: title, rows (dicts: rank, id, text, full, theme, cluster, marked),
// scores and shares (float64 bytes; a NaN share shows as "–"), selected (row or -1).

function render({ model, el }) {
  el.classList.add("ik", "ik-ranked");
  const choose = (row) => {
    model.set("selected", row);
    model.save_changes();
  };
  const draw = () => {
    const rows = model.get("rows") || [];
    const scores = f64(model.get("scores"));
    const shares = f64(model.get("shares"));
    const selected = model.get("selected");
    const children = [];
    if (model.get("title")) children.push(node("div", "ik-title", model.get("title")));
    if (!rows.length) {
      el.replaceChildren(...children, note(model.get("message") || "No sequences."));
      return;
    }
    const table = node("table", "ik-table", null, { tabindex: 0 });
    const head = node("tr");
    for (const [label, hint] of [
      ["#", "rank"],
      ["score", "influence on the query"],
      ["share", "share of the query's total influence of this sign (positive, or negative)"],
      ["id", "training sequence id"],
      ["text", "the sequence (hover for all of it)"],
      ["theme", "the sequence's theme (metadata) and cluster"],
    ]) {
      head.append(node("th", "", label, { title: hint }));
    }
    table.append(head);
    rows.forEach((row, r) => {
      let css = r === selected ? "ik-row ik-selected" : "ik-row";
      if (row.marked) css += " ik-marked";
      const tr = node("tr", css, null, { "data-row": r });
      tr.append(node("td", "ik-num", row.rank));
      tr.append(node("td", "ik-num", fmt(scores[r])));
      tr.append(node("td", "ik-num", Number.isNaN(shares[r]) ? "–" : pct(shares[r])));
      tr.append(node("td", "ik-id", row.id));
      tr.append(node("td", "ik-text", row.text, { title: row.full || row.text }));
      const theme = node("td", "ik-theme", row.theme || "");
      if (row.cluster >= 0) {
        const chip = node("span", "ik-chip", row.cluster, { title: `cluster ${row.cluster}` });
        chip.style.background = PALETTE[row.cluster % PALETTE.length];
        theme.prepend(chip);
      }
      tr.append(theme);
      table.append(tr);
    });
    table.addEventListener("click", (event) => {
      const tr = event.target.closest("tr[data-row]");
      if (tr) choose(Number(tr.dataset.row));
    });
    table.addEventListener("keydown", (event) => {
      const step = { ArrowDown: 1, ArrowUp: -1 }[event.key];
      if (!step) return;
      event.preventDefault();
      const now = model.get("selected");
      choose(Math.min(rows.length - 1, Math.max(0, now < 0 ? 0 : now + step)));
    });
    children.push(table);
    el.replaceChildren(...children);
    if (selected >= 0) table.focus({ preventScroll: true });
  };
  return redrawOn(
    model,
    ["title", "rows", "scores", "shares", "selected", "message"],
    draw,
  );
}

export default { render };
