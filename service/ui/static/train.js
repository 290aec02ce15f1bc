// "New model": classes with example images, one upload with a progress bar, a training job followed live,
// then its hold-out metrics. Files are checked by the server, and a refused file shows its message in place.

import { ApiError, apiSchemas, call, upload, watchJob } from "./api.js";
import { acceptDrops, el, metricsView, percent } from "./widgets.js";

const $ = (id) => document.getElementById(id);
const classes = [];
let nextClass = 1;
let choicesLoaded = false;
// The training options the form offers as choices of the schema's enums: each select's id, and its TrainingSpec field.
const ENUM_OPTIONS = { objective: "objective", "class-weighting": "class_weighting", scaling: "scaling" };

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
  if (choicesLoaded) return;
  try {
    const [{ backbones }, schemas] = await Promise.all([call("backbones"), apiSchemas()]);
    showBackbones(backbones);
    showEnumOptions(schemas);
    showKinds(trainingKinds(schemas));
    choicesLoaded = true;
  } catch (error) {
    $("new-error").textContent = `The backbones and kinds of head could not be listed: ${error.message}`;
  }
}

function showBackbones(backbones) {
  const names = backbones.map((b) => b.name.replace(/^backbones\//, ""));
  $("backbone").replaceChildren(...names.map((name) => el("option", { value: name }, name)),
    el("option", { value: "auto" }, "auto (graft picks the best for your images; slower)"));
}

/** Each enumerated training option's values, in the service's order, after a first "default" (left out of the
 * spec: the server decides); the field's description below it. */
function showEnumOptions(schemas) {
  for (const [id, field] of Object.entries(ENUM_OPTIONS)) {
    const property = schemas.TrainingSpec.properties[field];
    const ref = (property.anyOf ?? [property]).find((option) => option.$ref).$ref;
    const values = schemas[ref.split("/").pop()].enum;
    $(id).replaceChildren(el("option", { value: "" }, "default"),
      ...values.map((value) => el("option", { value }, value)));
    $(`${id}-help`).textContent = property.description;
  }
}

/** Every kind a TrainingSpec may ask for, in the service's order, with its description, whether it takes
 * hyper-parameters and which of finetune_blocks, scaling and class_weighting apply to it. TrainingSpec's schema
 * states the server's own cross-field rules as `allOf` if/then pairs; some of them say which kinds take what. */
function trainingKinds(schemas) {
  const spec = schemas.TrainingSpec;
  const descriptions = spec.properties.kind["x-enumDescriptions"];
  // "if kind is one of [...], then search and hyperparams are null"
  const untuned = spec.allOf.find((rule) => rule.then.properties?.hyperparams?.type === "null").if.properties.kind.enum;
  // "if finetune_blocks is set, then kind is one of [...], or auto_finetune is true"
  const blocksRule = spec.allOf.find((rule) => rule.if.required.includes("finetune_blocks"));
  const blockKinds = blocksRule.then.anyOf.flatMap((option) => option.properties.kind?.enum ?? []);
  // "if scaling (class_weighting) is set, then kind is one of [...]"
  const kindsTaking = (field) => spec.allOf.find((rule) => rule.if.required.includes(field)).then.properties.kind.enum;
  const scaledKinds = kindsTaking("scaling");
  const weightedKinds = kindsTaking("class_weighting");
  return schemas.TrainingKind.enum.map((name) => ({ name, description: descriptions[name],
    tuned: !untuned.includes(name), blocks: blockKinds.includes(name), scaled: scaledKinds.includes(name),
    weighted: weightedKinds.includes(name) }));
}

/** The kinds as options, the first chosen; the chosen one's description below them, and the settings it does not
 * take disabled. */
function showKinds(kinds) {
  const select = $("kind");
  select.replaceChildren(...kinds.map((kind) => el("option", { value: kind.name }, kind.name)));
  const showChosen = () => {
    const kind = kinds.find((k) => k.name === select.value);
    $("kind-help").textContent = kind.description;
    $("epochs").disabled = !kind.tuned;
    $("finetune-blocks").disabled = !kind.blocks;
    $("scaling").disabled = !kind.scaled;
    $("class-weighting").disabled = !kind.weighted;
  };
  select.addEventListener("change", showChosen);
  showChosen();
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
  const spec = { dataset, head, kind: $("kind").value || undefined, backbone: $("backbone").value || undefined };
  const holdout = Number($("holdout").value);
  if (holdout) spec.holdout_fraction = holdout;
  if ($("seed").value !== "") spec.seed = Number($("seed").value);
  // A setting the chosen kind does not take is disabled (showKinds), and left out.
  if ($("epochs").value !== "" && !$("epochs").disabled) spec.hyperparams = { epochs: Number($("epochs").value) };
  const blocks = $("finetune-blocks");
  if (blocks.value !== "" && !blocks.disabled) spec.finetune_blocks = Number(blocks.value);
  for (const [id, field] of Object.entries(ENUM_OPTIONS)) {
    if ($(id).value !== "" && !$(id).disabled) spec[field] = $(id).value;
  }
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
