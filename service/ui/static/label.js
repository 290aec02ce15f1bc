// "Label": the images of a dataset's unlabelled pool a head would learn most from, as a grid to label with one
// click (or one key) each, then a retraining of the head on the grown labels and the next suggestions.

import { ApiError, call, imageUrl, listAll, watchJob } from "./api.js";
import { el, percent } from "./widgets.js";

const $ = (id) => document.getElementById(id);
let shownUrls = [];  // object URLs of the grid's images, revoked when it is redrawn
let classes = [];  // the labels offered: the head's classes
let labelledNow = 0;  // images labelled since the last suggestions

export function setUpLabel() {
  $("label-form").addEventListener("submit", (event) => {
    event.preventDefault();
    suggest();
  });
  $("label-retrain").addEventListener("click", retrain);
  $("label-grid").addEventListener("keydown", onGridKey);
}

/** Fill the dataset and head choices; ``#label?dataset=ID&head=NAME`` preselects them. */
export async function showLabel() {
  const wanted = new URLSearchParams(location.hash.split("?")[1] || "");
  try {
    const [datasets, heads] = await Promise.all([listAll("datasets"), listAll("heads")]);
    fillSelect($("label-dataset"), datasets.map((d) => [d.name.replace(/^datasets\//, ""),
      `${d.display_name} (${d.unlabelled_example_count ?? 0} unlabelled)`]), wanted.get("dataset"));
    fillSelect($("label-head"), heads.map((h) => {
      const name = h.name.replace(/^heads\//, "");
      return [name, `${name} (latest, v${h.latest_version})`];
    }), wanted.get("head"));
    $("label-error").textContent = heads.length ? "" : "Train a head first: it judges which images to label.";
  } catch (error) {
    $("label-error").textContent = `Your datasets and heads could not be listed: ${error.message}`;
  }
}

function fillSelect(select, options, wanted) {
  const current = wanted || select.value;
  select.replaceChildren(...options.map(([value, text]) => el("option", { value, selected: value === current }, text)));
}

async function suggest() {
  const error = $("label-error");
  error.textContent = "";
  const dataset = $("label-dataset").value;
  const head = $("label-head").value;
  if (!dataset || !head) {
    error.textContent = "Choose a dataset with unlabelled images and the head that judges them.";
    return;
  }
  const grid = $("label-grid");
  grid.setAttribute("aria-busy", "true");
  $("label-status").textContent = "Ranking the unlabelled images…";
  try {
    const count = Number($("label-count").value) || 20;
    const answer = await call(
      `datasets/${encodeURIComponent(dataset)}:suggest?head=${encodeURIComponent(head)}&count=${count}`);
    classes = (await call(answer.head_version)).classes;  // the labels the judging version knows
    await drawGrid(answer);
  } catch (failure) {
    error.textContent = failure.message;
    $("label-status").textContent = "";
  } finally {
    grid.removeAttribute("aria-busy");
  }
}

async function drawGrid(answer) {
  for (const url of shownUrls) URL.revokeObjectURL(url);
  shownUrls = [];
  labelledNow = 0;
  const cards = await Promise.all(answer.suggestions.map(async (suggestion, i) => {
    const url = await imageUrl(`${suggestion.example.name}:image`);
    shownUrls.push(url);
    return card(suggestion, i, url);
  }));
  $("label-grid").replaceChildren(...cards);
  $("label-status").textContent = cards.length
    ? `${cards.length} of ${answer.pool_size} unlabelled images, the most useful first (${answer.head_version}). `
      + "Click a label, or focus an image and press its number (Enter: the likeliest)."
    : "No unlabelled images are left in this dataset.";
  $("label-retrain").hidden = cards.length === 0;
  if (cards.length) cards[0].focus();
}

function card(suggestion, position, url) {
  const example = suggestion.example;
  const shown = example.file_name || `#${example.index}`;
  const likeliest = suggestion.likeliest[0]?.label;
  const buttons = classes.map((label, i) => el("button", {
    type: "button",
    class: label === likeliest ? "label-choice likeliest" : "label-choice secondary",
    "data-label": label,
    "aria-pressed": "false",
    onclick: (event) => setLabel(event.target.closest(".label-card"), label),
  }, i < 9 ? `${i + 1} ${label}` : label));
  return el("figure", {
    class: "label-card card", tabindex: 0, "data-example": example.name, "data-position": position,
    "aria-label": `${shown}: ${suggestion.reason}`,
  },
  el("img", { src: url, alt: `unlabelled image ${shown}` }),
  el("figcaption", {},
    el("span", { class: "file-name" }, shown),
    el("small", {}, suggestion.likeliest.map((p) => `${p.label} ${percent(p.score)}`).join(" / ")),
    el("small", { class: "reason" }, suggestion.reason),
    el("div", { class: "label-choices", role: "group", "aria-label": `label of ${shown}` }, buttons),
    el("small", { class: "label-done", "aria-live": "polite" })));
}

/** PATCH the example's label; the card shows it, and focus moves to the next card. */
async function setLabel(cardNode, label) {
  const done = cardNode.querySelector(".label-done");
  try {
    await call(cardNode.dataset.example, { method: "PATCH", json: { label } });
  } catch (failure) {
    done.textContent = `not saved: ${failure instanceof ApiError ? failure.message : failure}`;
    return;
  }
  if (!cardNode.classList.contains("labelled")) labelledNow += 1;
  cardNode.classList.add("labelled");
  for (const button of cardNode.querySelectorAll(".label-choice")) {
    button.setAttribute("aria-pressed", String(button.dataset.label === label));
  }
  done.textContent = `labelled ${label}`;
  $("label-retrain").textContent = `Retrain with ${labelledNow} new label${labelledNow === 1 ? "" : "s"}`;
  const next = cardNode.nextElementSibling;
  if (next) next.focus();
}

/** Keys on a focused card: 1-9 its label by number, Enter the likeliest, arrows to the neighbours. */
function onGridKey(event) {
  const cardNode = event.target.closest(".label-card");
  if (!cardNode || event.target !== cardNode) return;
  if (/^[1-9]$/.test(event.key) && classes[Number(event.key) - 1] !== undefined) {
    event.preventDefault();
    setLabel(cardNode, classes[Number(event.key) - 1]);
  } else if (event.key === "Enter") {
    event.preventDefault();
    const likeliest = cardNode.querySelector(".likeliest");
    if (likeliest) setLabel(cardNode, likeliest.dataset.label);
  } else if (event.key === "ArrowRight" || event.key === "ArrowDown") {
    event.preventDefault();
    cardNode.nextElementSibling?.focus();
  } else if (event.key === "ArrowLeft" || event.key === "ArrowUp") {
    event.preventDefault();
    cardNode.previousElementSibling?.focus();
  }
}

/** Train the head again on the dataset's labels (a new version), show its hold-out accuracy, suggest again. */
async function retrain() {
  const dataset = $("label-dataset").value;
  const head = $("label-head").value;
  const button = $("label-retrain");
  const status = $("label-status");
  button.disabled = true;
  try {
    let job = await call("jobs", { method: "POST", json: { dataset: `datasets/${dataset}`, head } });
    job = await watchJob(job.name, (update) => {
      status.textContent = `Training: ${percent(update.progress)} ${update.phase}`;
    });
    if (job.state !== "succeeded") {
      $("label-error").textContent = `Training ${job.state}: ${job.error || job.message}`;
      return;
    }
    const trained = await call(job.head_version);
    await suggest();
    const accuracy = trained.metrics?.accuracy;
    status.textContent = `${job.head_version} trained${accuracy === undefined ? "" : `: hold-out accuracy ${
      percent(accuracy)}`}. ${status.textContent}`;
  } catch (failure) {
    $("label-error").textContent = `Training could not start: ${failure.message}`;
  } finally {
    button.disabled = false;
    button.textContent = "Retrain";
  }
}
