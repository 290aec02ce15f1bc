// "New model": classes with example images, one upload with a progress bar, a training job followed live,
// then its hold-out metrics. Files are checked by the server, and a refused file shows its message in place.

import { ApiError, call, upload, watchJob } from "./api.js";
import { acceptDrops, el, metricsView, percent } from "./widgets.js";

const $ = (id) => document.getElementById(id);
const classes = [];
let nextClass = 1;
let backbonesLoaded = false;

export function setUpNewModel() {
  $("add-class").addEventListener("click", () => addClass().name.focus());
  $("new-form").addEventListener("submit", (event) => {
    event.preventDefault();
    uploadAndTrain();
  });
  addClass();
  addClass();
}

export async function showNewModel() {
  if (backbonesLoaded) return;
  const select = $("backbone");
  try {
    const { backbones } = await call("backbones");
    const names = backbones.map((b) => b.name.replace(/^backbones\//, ""));
    select.replaceChildren(...names.map((name) => el("option", { value: name }, name)),
      el("option", { value: "auto" }, "auto (graft picks the best for your images; slower)"));
    backbonesLoaded = true;
  } catch (error) {
    $("new-error").textContent = `The backbones could not be listed: ${error.message}`;
  }
}

function addClass() {
  const n = nextClass++;
  const entry = { files: [] };
  entry.name = el("input", { id: `class-name-${n}`, class: "class-name", required: true, maxlength: 128, autocomplete: "off",
    spellcheck: "false" });
  entry.count = el("p", { class: "count", "aria-live": "polite" }, "no images yet");
  entry.thumbs = el("ul", { class: "thumbs", "aria-label": `images of class ${n}` });
  const pick = el("input", { id: `class-files-${n}`, class: "visually-hidden class-files", type: "file",
    multiple: true, accept: "image/*", onchange: (event) => { addFiles(entry, event.target.files); event.target.value = ""; } });
  const folder = el("input", { id: `class-folder-${n}`, class: "visually-hidden class-folder", type: "file",
    webkitdirectory: true, onchange: (event) => { addFiles(entry, event.target.files); event.target.value = ""; } });
  const drop = el("div", { class: "drop" },
    el("p", {}, "Drop images here, or"),
    el("label", { class: "button secondary", for: pick.id }, "choose images", el("span", { class: "visually-hidden" }, ` of class ${n}`)), pick,
    el("label", { class: "button secondary", for: folder.id }, "choose a folder", el("span", { class: "visually-hidden" }, ` of class ${n}`)), folder);
  acceptDrops(drop, (files) => addFiles(entry, files));
  entry.card = el("fieldset", { class: "card class-card" },
    el("legend", {}, `Class ${n}`),
    el("label", { for: entry.name.id }, "Class name"), entry.name,
    drop, entry.count, entry.thumbs,
    el("button", { type: "button", class: "quiet", onclick: () => removeClass(entry) }, `Remove class ${n}`));
  classes.push(entry);
  $("classes").append(entry.card);
  return entry;
}

function removeClass(entry) {
  classes.splice(classes.indexOf(entry), 1);
  for (const item of entry.files) URL.revokeObjectURL(item.url);
  entry.card.remove();
}

function addFiles(entry, fileList) {
  for (const file of fileList) {
    if (file.name.startsWith(".")) continue;  // .DS_Store and friends from a picked folder
    const item = { file, url: URL.createObjectURL(file), error: el("p", { class: "file-error", role: "alert" }) };
    item.li = el("li", { class: "thumb" },
      el("img", { src: item.url, alt: file.name, loading: "lazy" }),
      el("span", { class: "file-name" }, file.name),
      el("button", { type: "button", class: "quiet", "aria-label": `Remove ${file.name}`,
        onclick: () => removeFile(entry, item) }, "×"),
      item.error);
    entry.files.push(item);
    entry.thumbs.append(item.li);
  }
  updateCount(entry);
}

function removeFile(entry, item) {
  entry.files.splice(entry.files.indexOf(item), 1);
  URL.revokeObjectURL(item.url);
  item.li.remove();
  updateCount(entry);
}

function updateCount(entry) {
  const n = entry.files.length;
  entry.count.textContent = n === 0 ? "no images yet" : `${n} image${n === 1 ? "" : "s"}`;
}

/** What the form says, or a message for the person to act on. */
function readForm() {
  const head = $("head-name").value.trim();
  if (!/^[a-z][a-z0-9-]{0,62}$/.test(head)) {
    return { problem: "Give the model a name: lowercase letters, digits and dashes, starting with a letter.", focus: $("head-name") };
  }
  const named = classes.map((entry) => ({ entry, label: entry.name.value.trim() }));
  const unnamed = named.find(({ label }) => !label);
  if (unnamed) return { problem: "Every class needs a name.", focus: unnamed.entry.name };
  const labels = named.map(({ label }) => label);
  if (new Set(labels).size !== labels.length) return { problem: "Two classes have the same name.", focus: $("classes") };
  if (named.length < 2) return { problem: "Add at least two classes.", focus: $("add-class") };
  const empty = named.find(({ entry }) => entry.files.length === 0);
  if (empty) return { problem: `Class '${empty.label}' has no images yet.`, focus: empty.entry.name };
  return { head, named };
}

function trainingSpec(dataset, head) {
  const spec = { dataset, head, kind: $("kind").value, backbone: $("backbone").value || undefined };
  const holdout = Number($("holdout").value);
  if (holdout) spec.holdout_fraction = holdout;
  if ($("seed").value !== "") spec.seed = Number($("seed").value);
  const tuned = !["prototype", "auto"].includes(spec.kind); // those take no hyper-parameters
  if ($("epochs").value !== "" && tuned) spec.hyperparams = { epochs: Number($("epochs").value) };
  if ($("finetune-blocks").value !== "" && spec.kind === "finetune") spec.finetune_blocks = Number($("finetune-blocks").value);
  return spec;
}

async function uploadAndTrain() {
  const problem = $("new-error");
  problem.textContent = "";
  for (const entry of classes) for (const item of entry.files) item.error.textContent = "";
  const form = readForm();
  if (form.problem) {
    problem.textContent = form.problem;
    form.focus.focus();
    return;
  }
  const button = $("train");
  button.disabled = true;
  $("result").hidden = true;
  try {
    const dataset = await uploadImages(form.head, form.named);
    if (dataset) await train(trainingSpec(dataset.name, form.head), form.head);
  } finally {
    button.disabled = false;
  }
}

/** One multipart upload of every class's images. A refused file gets the server's message beside it. */
async function uploadImages(head, named) {
  const body = new FormData();
  const byName = new Map();
  body.append("display_name", head);
  for (const { entry, label } of named) {
    for (const item of entry.files) {
      let name = `${label}/${item.file.name}`;
      for (let i = 2; byName.has(name); i++) name = `${label}/${i}-${item.file.name}`;
      byName.set(name, item);
      body.append("files", item.file, name);
      body.append("labels", label);
    }
  }
  $("upload-status").hidden = false;
  const bar = $("upload-bar");
  const text = $("upload-text");
  bar.value = 0;
  text.textContent = `${byName.size} images`;
  try {
    const dataset = await upload("datasets", body, (fraction) => {
      bar.value = Math.round(fraction * 100);
      text.textContent = fraction < 1 ? `${percent(fraction)} of ${byName.size} images` : "checking the images…";
    });
    text.textContent = `${dataset.example_count} images stored`;
    return dataset;
  } catch (error) {
    text.textContent = "upload refused";
    const item = error instanceof ApiError ? byName.get(error.details.file) : undefined;
    if (item) {
      item.error.textContent = error.message;
      $("new-error").textContent = "The service refused a file: remove or replace it (marked below), then try again.";
      item.li.scrollIntoView({ block: "center" });
    } else {
      $("new-error").textContent = error.message;
    }
    return null;
  }
}

async function train(spec, head) {
  $("train-status").hidden = false;
  const bar = $("train-bar");
  const text = $("train-text");
  bar.value = 0;
  text.textContent = "queued";
  let job;
  try {
    job = await call("jobs", { method: "POST", json: spec });
    job = await watchJob(job.name, (update) => {
      bar.value = Math.round(update.progress * 100);
      text.textContent = `${update.state}: ${update.phase}${update.message ? ` (${update.message})` : ""}`;
    });
  } catch (error) {
    $("new-error").textContent = `Training could not start: ${error.message}`;
    return;
  }
  if (job.state !== "succeeded") {
    text.textContent = job.state;
    $("new-error").textContent = `Training ${job.state}: ${job.error || job.message}`;
    return;
  }
  bar.value = 100;
  const [, name, version] = job.head_version.match(/^heads\/(.+)\/versions\/(\d+)$/);
  text.textContent = `done: ${name} version ${version}`;
  const trained = await call(job.head_version); // this version with its whole metrics, not every version's
  $("result-metrics").replaceChildren(
    el("p", {}, `${name} version ${version}: ${trained.kind} head on ${trained.backbone}.`),
    metricsView(trained.metrics, trained.classes));
  $("result-try").href = `#try?${name}@${version}`;
  $("result").hidden = false;
  $("result-title").focus();  // screen readers announce the results
}
