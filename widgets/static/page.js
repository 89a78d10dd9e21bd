// The static explorer page: the same component modules as the live widget, each driven by
// a small stand-in for anywidget's model that holds the states Python wrote into the page.
// Python defines MODULES (table, tokens, pair, matrix, themes → { render }) before this.

// JSON with binary arrays written as {"$bytes": base64}, read back as DataViews.
function readData() {
  const text = document.getElementById("ik-data").textContent;
  return JSON.parse(text, (key, value) => {
    if (value && typeof value === "object" && typeof value.$bytes === "string") {
      const raw = atob(value.$bytes);
      const bytes = new Uint8Array(raw.length);
      for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
      return new DataView(bytes.buffer);
    }
    return value;
  });
}

// get / set / on / off / save_changes, like anywidget's model; set fires change:<key>.
function pageModel(state) {
  const values = { ...state };
  const handlers = {};
  return {
    get: (key) => values[key],
    set(key, value) {
      if (values[key] === value) return;
      values[key] = value;
      for (const handler of [...(handlers[`change:${key}`] || [])]) handler();
    },
    replace(next) {
      for (const [key, value] of Object.entries(next)) this.set(key, value);
    },
    on(event, handler) {
      (handlers[event] = handlers[event] || []).push(handler);
    },
    off(event, handler) {
      handlers[event] = (handlers[event] || []).filter((h) => h !== handler);
    },
    save_changes() {},
    send() {},
  };
}

const data = readData();
const picker = document.getElementById("ik-query");
// +1: each query's most positive sequences; -1: its most negative ones ("lowers")
let direction = 1;
const shown = (q) => (direction > 0 ? data.queries[q] : data.queries[q].lowers);

// a query's state of each view before any row is picked
const initial = (q) => ({
  table: { ...shown(q).table, selected: -1 },
  matrix: { ...shown(q).matrix, selected: -1 },
  themes: { ...data.themes_common, ...data.queries[q].themes, selected: -1 },
  pair: shown(q).pair[0],
  tokens: shown(q).tokens[0],
});
const models = {};
for (const [name, module] of Object.entries(MODULES)) {
  models[name] = pageModel(initial(0)[name]);
  module.render({ model: models[name], el: document.getElementById(`ik-${name}`) });
}

function showQuery(q) {
  picker.value = String(q);
  document.querySelectorAll(".ik-header").forEach((section) => {
    section.hidden = section.dataset.query !== String(q);
  });
  const state = initial(q);
  for (const name of ["table", "matrix", "themes"]) models[name].replace(state[name]);
  selectRow(-1);
}

// rows without precomputed tokens get the page's note for them
function selectRow(r) {
  const query = shown(Number(picker.value));
  models.table.set("selected", r);
  models.matrix.set("selected", r);
  models.pair.replace(query.pair[r + 1]);
  models.tokens.replace(query.tokens[r + 1] || data.no_tokens);
}

models.table.on("change:selected", () => selectRow(models.table.get("selected")));
models.matrix.on("change:selected", () => selectRow(models.matrix.get("selected")));
picker.addEventListener("change", () => showQuery(Number(picker.value)));

document.querySelectorAll("[data-direction]").forEach((button) => {
  button.addEventListener("click", () => {
    direction = Number(button.dataset.direction);
    document.querySelectorAll("[data-direction]").forEach((b) => {
      b.setAttribute("aria-pressed", String(b === button));
    });
    showQuery(Number(picker.value));
  });
});

document.querySelectorAll("[data-tab]").forEach((button) => {
  button.addEventListener("click", () => {
    document.querySelectorAll("[data-tab]").forEach((b) => {
      b.setAttribute("aria-selected", String(b === button));
    });
    document.querySelectorAll("[data-panel]").forEach((panel) => {
      panel.hidden = panel.dataset.panel !== button.dataset.tab;
    });
  });
});

showQuery(0);
