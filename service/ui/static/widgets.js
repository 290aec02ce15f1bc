// Small pieces several pages draw: elements, score bars, metrics with their confusion matrix.

/** document.createElement with attributes and children; strings become text (never HTML). */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name === "class") node.className = value;
    else if (name === "style") node.style.cssText = value; // through the CSSOM: the CSP refuses style attributes
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().filter((child) => child !== null && child !== undefined));
  return node;
}

export const percent = (value) => `${(100 * value).toFixed(1)} %`;

/** One label with its score as a bar; the number is in the text too, for screen readers and small screens. */
export function scoreBar(label, score) {
  return el("li", { class: "score" },
    el("span", { class: "score-label" }, label),
    el("span", { class: "score-track", role: "meter", "aria-valuemin": 0, "aria-valuemax": 100,
      "aria-valuenow": Math.round(score * 100), "aria-label": `${label} score` },
      el("span", { class: "score-fill", style: `width: ${Math.max(0.5, score * 100)}%` })),
    el("span", { class: "score-value" }, percent(score)));
}

/** Hold-out metrics of a head version: accuracy, calibration, per class, and the confusion matrix. */
export function metricsView(metrics, classes) {
  if (!metrics || metrics.accuracy === undefined) return el("p", {}, "No hold-out metrics for this version.");
  const summary = el("dl", { class: "figures" },
    el("div", {}, el("dt", {}, "accuracy"), el("dd", { class: "accuracy" }, percent(metrics.accuracy))),
    el("div", {}, el("dt", {}, "hold-out images"), el("dd", {}, String(metrics.num_examples ?? "?"))),
    el("div", {}, el("dt", {}, "calibration error (ECE)"), el("dd", {}, (metrics.ece ?? 0).toFixed(3))));
  const perClass = (metrics.per_class || []).map((row) => el("tr", {},
    el("th", { scope: "row" }, row.label),
    el("td", {}, percent(row.precision)), el("td", {}, percent(row.recall)), el("td", {}, row.f1.toFixed(3)),
    el("td", {}, String(row.support))));
  const table = el("table", { class: "per-class" },
    el("caption", {}, "Per class, on the hold-out images"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "class"), el("th", { scope: "col" }, "precision"),
      el("th", { scope: "col" }, "recall"), el("th", { scope: "col" }, "F1"), el("th", { scope: "col" }, "images"))),
    el("tbody", {}, perClass));
  return el("div", { class: "metrics" }, summary, el("div", { class: "scroll" }, table),
    metrics.confusion ? confusionMatrix(metrics.confusion, classes) : null);
}

const HOLD_OUT = {
  corner: "true ↓ predicted →",
  caption: "Confusion matrix on the hold-out images: rows are the true class, columns what the head predicted; green cells are right.",
};

/** A confusion matrix as a table shaded by each row's share: by default rows are true classes, columns predictions
 * (``corner`` and ``caption`` say otherwise, e.g. a served version's labels against its shadow's). */
export function confusionMatrix(confusion, classes, { corner, caption } = HOLD_OUT) {
  const header = el("tr", {}, el("th", { scope: "col", class: "corner" }, corner),
    classes.map((name) => el("th", { scope: "col" }, name)));
  const rows = confusion.map((row, i) => {
    const total = row.reduce((a, b) => a + b, 0) || 1;
    return el("tr", {}, el("th", { scope: "row" }, classes[i]), row.map((count, j) => {
      const share = count / total;
      // At most half-strength colour, so dark text keeps a contrast above 7:1 on every cell.
      return el("td", {
        class: i === j ? "diagonal" : null,
        style: `background: rgba(${i === j ? "22, 101, 52" : "153, 27, 27"}, ${(0.05 + 0.45 * share).toFixed(2)})`,
        title: `${count} of ${total} images in row ${classes[i]}, column ${classes[j]}`,
      }, String(count));
    }));
  });
  return el("figure", { class: "confusion" },
    el("div", { class: "scroll" }, el("table", { class: "confusion-matrix" },
      el("thead", {}, header), el("tbody", {}, rows))),
    el("figcaption", {}, caption));
}

/** Drag and drop onto ``zone``: files, and the files inside dropped folders. */
export function acceptDrops(zone, onFiles) {
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    const entries = [...event.dataTransfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry());
    if (entries.some((entry) => entry && entry.isDirectory)) onFiles(await filesOf(entries));
    else onFiles(event.dataTransfer.files);
  });
}

async function filesOf(entries) {
  const files = [];
  for (const entry of entries) {
    if (!entry) continue;
    if (entry.isFile) files.push(await new Promise((resolve, reject) => entry.file(resolve, reject)));
    else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (let batch = await readBatch(reader); batch.length; batch = await readBatch(reader)) {
        files.push(...(await filesOf(batch)));
      }
    }
  }
  return files;
}

const readBatch = (reader) => new Promise((resolve, reject) => reader.readEntries(resolve, reject));

export function formatTime(text) {
  return text ? new Date(text).toLocaleString() : "";
}
