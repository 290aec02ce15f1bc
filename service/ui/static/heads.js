// "Your heads": every head with its versions, aliases and hold-out metrics; set or remove an alias; export; its
// shadow version and live traffic.

import { apiSchemas, call, download, listAll } from "./api.js";
import { monitorStatus, versionMonitoring } from "./monitor.js";
import { shadowPanel } from "./shadow.js";
import { el, formatTime, metricsView, percent } from "./widgets.js";

const list = () => document.getElementById("heads-list");

export async function showHeads() {
  list().replaceChildren(el("p", {}, "Loading your heads…"));
  let heads, schemas;
  try {
    [heads, schemas] = await Promise.all([listAll("heads"), apiSchemas()]);
  } catch (error) {
    list().replaceChildren(el("p", { class: "error", role: "alert" }, `Your heads could not be listed: ${error.message}`));
    return;
  }
  if (heads.length === 0) {
    list().replaceChildren(el("p", {}, "No heads yet. ", el("a", { href: "#new" }, "Teach a new model"), " to make one."));
    return;
  }
  const formats = schemas.ExportFormat.enum;
  list().replaceChildren(...heads.map((head) => headCard(head, formats)));
}

const shortName = (head) => head.name.replace(/^heads\//, "");

function headCard(head, formats) {
  const name = shortName(head);
  const status = el("p", { class: "error", role: "alert" });
  const versions = [...head.versions].sort((a, b) => b.version - a.version);
  return el("article", { class: "card head", "aria-labelledby": `head-${name}` },
    el("h2", { id: `head-${name}` }, name),
    el("p", { class: "hint" }, `latest version ${head.latest_version}`,
      versions[0] ? ` · ${versions[0].kind} on ${versions[0].backbone} · ${versions[0].classes.join(", ")}` : ""),
    monitorStatus(name),
    aliasList(name, head, status),
    el("div", { class: "scroll" }, versionTable(name, versions, formats, head.shadow_version, status)),
    versions.map((v) => versionMetrics(name, v)),
    aliasForm(name, versions, status),
    shadowPanel(name, head, versions, (change) => act(status, change)),
    versions.map((v) => versionMonitoring(name, v.version)),
    status);
}

/** A version's hold-out metrics, fetched when first opened: a head carries only their summaries (accuracy, ECE),
 * and the whole of a 1,000-class version (its confusion matrix) is megabytes. */
function versionMetrics(name, version) {
  const body = el("div", {}, el("p", {}, "Loading the metrics…"));
  let loaded = false;
  const details = el("details", { class: "version-metrics", ontoggle: async () => {
    if (!details.open || loaded) return;
    loaded = true;
    try {
      const full = await call(`heads/${name}/versions/${version.version}`);
      body.replaceChildren(metricsView(full.metrics, full.classes));
    } catch (error) {
      loaded = false; // opening it again tries again
      body.replaceChildren(el("p", { class: "error", role: "alert" },
        `The metrics of version ${version.version} could not be loaded: ${error.message}`));
    }
  } }, el("summary", {}, `Hold-out metrics of version ${version.version}`), body);
  return details;
}

function aliasList(name, head, status) {
  const entries = Object.entries(head.aliases).filter(([alias]) => alias !== "latest");
  if (entries.length === 0) return el("p", { class: "aliases" }, "No aliases yet.");
  return el("ul", { class: "aliases", "aria-label": `aliases of ${name}` }, entries.map(([alias, version]) =>
    el("li", { class: "alias" }, el("code", {}, `${name}:${alias}`), ` → version ${version} `,
      el("button", { type: "button", class: "quiet", "aria-label": `Remove alias ${alias} of ${name}`,
        onclick: () => act(status, () => call(`heads/${name}/aliases/${alias}`, { method: "DELETE" })) }, "Remove"))));
}

/** Each version with a download button per export format the service offers; the shadow is marked. */
function versionTable(name, versions, formats, shadowVersion, status) {
  return el("table", { class: "versions" },
    el("caption", { class: "visually-hidden" }, `Versions of ${name}`),
    el("thead", {}, el("tr", {}, ["version", "kind", "backbone", "accuracy", "trained", "aliases", "export"]
      .map((title) => el("th", { scope: "col" }, title)))),
    el("tbody", {}, versions.map((v) => el("tr", {},
      el("th", { scope: "row" }, String(v.version)),
      el("td", {}, v.kind), el("td", {}, v.backbone),
      el("td", {}, v.metrics.accuracy === undefined ? "–" : percent(v.metrics.accuracy)),
      el("td", {}, formatTime(v.create_time)),
      el("td", {}, [...v.aliases, ...(v.version === shadowVersion ? ["(shadow)"] : [])].join(", ")),
      el("td", { class: "actions" },
        formats.map((format) => el("button", { type: "button", class: "quiet",
          "aria-label": `Download ${name} version ${v.version} as ${format}`,
          onclick: () => act(status, () => download(`heads/${name}@${v.version}:export?format=${format}`), false) },
        format)),
        el("a", { href: `#try?${name}@${v.version}`, "aria-label": `Try ${name} version ${v.version}` }, "try"))))));
}

function aliasForm(name, versions, status) {
  const aliasId = `alias-${name}`;
  const versionId = `alias-version-${name}`;
  const alias = el("input", { id: aliasId, required: true, pattern: "[a-z][a-z0-9\\-]{0,62}", placeholder: "prod",
    autocomplete: "off", spellcheck: "false" });
  const version = el("select", { id: versionId }, versions.map((v) => el("option", { value: v.version }, `version ${v.version}`)));
  return el("form", { class: "inline", "aria-label": `Set an alias of ${name}`, onsubmit: (event) => {
    event.preventDefault();
    act(status, () => call(`heads/${name}/aliases/${alias.value.trim()}`,
      { method: "PUT", json: { version: Number(version.value) } }));
  } },
  el("label", { for: aliasId }, "Alias"), alias,
  el("label", { for: versionId }, "points at"), version,
  el("button", { type: "submit" }, "Set alias"));
}

/** Run a change; show the server's message if it fails, else redraw the list. */
async function act(status, change, redraw = true) {
  status.textContent = "";
  try {
    await change();
  } catch (error) {
    status.textContent = error.message;
    return;
  }
  if (redraw) await showHeads();
}
