// TokenHeatmap: one sequence, token by token, coloured by each token's influence.
// Traits: title, tokens (list of str), scores (float64 bytes), scale (0 = largest |score|),
// message (shown instead when there are no tokens); hovered (token index, set here).

function render({ model, el }) {
  el.classList.add("ik", "ik-tokens");
  const draw = () => {
    const tokens = model.get("tokens") || [];
    const scores = f64(model.get("scores"));
    const scale = model.get("scale") || maxAbs(scores);
    const children = [];
    if (model.get("title")) children.push(node("div", "ik-title", model.get("title")));
    if (!tokens.length) {
      el.replaceChildren(...children, note(model.get("message") || "No tokens to show."));
      return;
    }
    children.push(legend(scale, "the completion's log-probability"));
    const text = node("div", "ik-token-text");
    tokens.forEach((token, k) => {
      const value = scores[k];
      const span = node("span", "ik-tok", token, {
        "data-index": k,
        title: `${JSON.stringify(token)}: ${exact(value)}`,
      });
      span.style.background = diverging(value, scale);
      text.append(span);
    });
    let total = 0;
    for (const v of scores) total += v;
    children.push(text, note(`${tokens.length} tokens; they sum to ${fmt(total)}.`));
    el.replaceChildren(...children);
    const tip = tooltip(el);
    text.addEventListener("mousemove", (event) => {
      const span = event.target.closest(".ik-tok");
      if (!span) return tip.hide();
      const k = Number(span.dataset.index);
      tip.show(event, [JSON.stringify(tokens[k]), `score ${exact(scores[k])}`, `position ${k}`]);
      if (model.get("hovered") !== k) {
        model.set("hovered", k);
        model.save_changes();
      }
    });
    text.addEventListener("mouseleave", () => tip.hide());
  };
  return redrawOn(model, ["title", "tokens", "scores", "scale", "message"], draw);
}

export default { render };
