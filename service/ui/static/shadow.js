// A head's shadow version (PUT/DELETE /v1/heads/{head}:shadow), which answers every prediction beside the served
// one unseen by callers, and how the two compared (GET /v1/heads/{head}:compare).

import { call } from "./api.js";
import { confusionMatrix, el, percent } from "./widgets.js";

/** The shadow now, a form to set or stop it, and the comparisons (fetched when opened). ``act`` runs a change. */
export function shadowPanel(name, head, versions, act) {
  const versionId = `shadow-version-${name}`;
  const version = el("select", { id: versionId },
    versions.map((v) => el("option", { value: v.version, selected: v.version === head.shadow_version }, `version ${v.version}`)));
  const now = head.shadow_version === null || head.shadow_version === undefined
    ? el("p", { class: "shadow" }, "No shadow: only the served version answers.")
    : el("p", { class: "shadow" }, `Version ${head.shadow_version} shadows this head: it answers every prediction beside the served version, unseen by callers. `,
      el("button", { type: "button", class: "quiet", "aria-label": `Stop shadowing ${name}`,
        onclick: () => act(() => call(`heads/${name}:shadow`, { method: "DELETE" })) }, "Stop shadowing"));
  const form = el("form", { class: "inline", "aria-label": `Set the shadow version of ${name}`, onsubmit: (event) => {
    event.preventDefault();
    act(() => call(`heads/${name}:shadow`, { method: "PUT", json: { version: Number(version.value) } }));
  } }, el("label", { for: versionId }, "Shadow with"), version, el("button", { type: "submit" }, "Set shadow"));
  return el("section", { class: "shadow-panel", "aria-label": `Shadow version of ${name}` }, now, form, comparisons(name));
}

function comparisons(name) {
  const body = el("div", {}, el("p", {}, "Loading the comparisons…"));
  let loaded = false;
  const details = el("details", { class: "comparisons", ontoggle: async () => {
    if (!details.open || loaded) return;
    loaded = true;
    try {
      const found = await call(`heads/${name}:compare`);
      body.replaceChildren(...(found.comparisons.length ? found.comparisons.map(comparisonView)
        : [el("p", {}, "No shadow has answered yet.")]));
    } catch (error) {
      loaded = false; // opening it again tries again
      body.replaceChildren(el("p", { class: "error", role: "alert" }, `The comparisons could not be loaded: ${error.message}`));
    }
  } }, el("summary", {}, "Shadow against served"), body);
  return details;
}

function comparisonView(c) {
  const figure = (term, value) => el("div", {}, el("dt", {}, term), el("dd", {}, value));
  const difference = c.mean_top_score_difference;
  return el("div", { class: "comparison" },
    el("h3", {}, `Shadow version ${c.shadow_version} beside served version ${c.served_version}`),
    el("dl", { class: "figures" },
      figure("images compared", String(c.compared)),
      figure("agreement", c.agreement === null ? "–" : percent(c.agreement)),
      figure("top score, shadow − served", difference === null ? "–" : `${difference >= 0 ? "+" : ""}${difference.toFixed(3)}`),
      figure("reported labels", String(c.labelled)),
      figure("accuracy served", c.served_accuracy === null ? "–" : percent(c.served_accuracy)),
      figure("accuracy shadow", c.shadow_accuracy === null ? "–" : percent(c.shadow_accuracy))),
    c.confusion.length ? confusionMatrix(c.confusion, c.labels, {
      corner: "served ↓ shadow →",
      caption: "Rows are the served version's label, columns the shadow's; green cells are images both labelled alike.",
    }) : null);
}
