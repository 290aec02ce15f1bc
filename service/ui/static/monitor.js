// A head version's live traffic (GET /v1/heads/{head}/versions/{v}:monitor): its status, drifting highlighted, and
// one small chart per figure, window by window: predictions, OOD rate, drift statistic against its threshold,
// abstention rate. Charts are SVG drawn here; the same numbers are in a table beside them.

import { call } from "./api.js";
import { el, formatTime, percent } from "./widgets.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 360;
const HEIGHT = 130;
const PAD = { left: 52, right: 6, top: 10, bottom: 10 };
const INSET = 10; // room for a bar or a drifting window's mark at either end

/** The head's status line: the version it serves by default, fetched with the card, drifting in red. */
export function monitorStatus(name) {
  const line = el("p", { class: "monitor-status hint" }, "Live traffic: …");
  call(`heads/${name}:monitor`).then(
    (found) => line.replaceChildren(statusText(found)),
    (error) => line.replaceChildren(`Live traffic: not monitored (${error.message})`));
  return line;
}

const rate = (value) => (value === null || value === undefined ? "–" : percent(value));
const wholePercent = (value) => `${Math.round(100 * value)} %`;

function statusText(found) {
  const status = found.status ?? "unknown";
  const badge = el("strong", { class: `status status-${["ok", "drifting"].includes(status) ? status : "other"}` }, status);
  const since = found.drifting_since ? ` since ${formatTime(found.drifting_since)}` : "";
  const count = found.windows.reduce((total, w) => total + w.predictions, 0);
  return el("span", {}, `Live traffic of version ${found.version}: `, badge, since,
    ` · ${count} predictions in ${found.windows.length} closed windows`,
    found.live.labelled ? ` · live accuracy ${rate(found.live.accuracy)} on ${found.live.labelled} reported labels` : "",
    found.reference ? "" : ` · no drift test: ${found.reference_note || "the version has no monitoring reference"}`);
}

/** A version's monitoring, fetched when first opened (like its metrics). */
export function versionMonitoring(name, version) {
  const body = el("div", {}, el("p", {}, "Loading the monitoring…"));
  let loaded = false;
  const details = el("details", { class: "version-monitoring", ontoggle: async () => {
    if (!details.open || loaded) return;
    loaded = true;
    try {
      body.replaceChildren(monitoringView(await call(`heads/${name}/versions/${version}:monitor`)));
    } catch (error) {
      loaded = false; // opening it again tries again
      body.replaceChildren(el("p", { class: "error", role: "alert" },
        `The monitoring of version ${version} could not be loaded: ${error.message}`));
    }
  } }, el("summary", {}, `Live traffic of version ${version}`), body);
  return details;
}

function monitoringView(found) {
  const windows = found.windows;
  const head = el("p", { class: found.status === "drifting" ? "drift-alert" : null, role: found.status === "drifting" ? "alert" : null },
    statusText(found));
  if (windows.length === 0) return el("div", { class: "monitoring" }, head, el("p", {}, "No window of predictions yet."));
  const drifting = windows.map((w) => Boolean(w.drift && w.drift.drifting));
  const evidence = found.evidence && found.evidence.drift
    ? el("p", {}, `Evidence: the window ending ${formatTime(found.evidence.end_time)}, drift statistic `,
      `${found.evidence.drift.statistic.toFixed(3)} above its threshold ${found.evidence.drift.threshold.toFixed(3)} `,
      `(${found.evidence.drift.test}, ${found.evidence.drift.window} predictions).`)
    : null;
  const charts = el("div", { class: "charts" },
    chart("Predictions per window", [{ values: windows.map((w) => w.predictions), kind: "bars" }], drifting, String),
    chart("Out-of-distribution rate", [{ values: windows.map((w) => w.ood_rate ?? null) }], drifting, percent, 1, wholePercent),
    chart("Drift statistic and its threshold (dashed)", [
      { values: windows.map((w) => (w.drift ? w.drift.statistic : null)) },
      { values: windows.map((w) => (w.drift ? w.drift.threshold : null)), kind: "threshold" }],
    drifting, (v) => v.toFixed(2)),
    chart("Abstention rate", [{ values: windows.map((w) => w.abstention_rate ?? null) }], drifting, percent, 1, wholePercent));
  return el("div", { class: "monitoring" }, head, evidence, charts,
    el("p", { class: "hint" }, `Windows oldest first, from ${formatTime(windows[0].end_time)} to ${formatTime(windows.at(-1).end_time)}; `,
      "red marks a window whose drift test crossed its threshold."),
    windowTable(windows));
}

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

/** One figure per window as a small chart: bars or lines; a threshold dashed; drifting windows marked red.
 * ``format`` writes a value for the chart's label, ``tick`` (default ``format``) for its axis. */
function chart(title, series, drifting, format, fixedMax, tick) {
  const all = series.flatMap((s) => s.values).filter((v) => v !== null);
  const top = fixedMax ?? (Math.max(...all, 0) || 1);
  const count = series[0].values.length;
  const plotWidth = WIDTH - PAD.left - PAD.right;
  const plotHeight = HEIGHT - PAD.top - PAD.bottom;
  const x = (i) => PAD.left + INSET + (count === 1 ? plotWidth / 2 - INSET : (i * (plotWidth - 2 * INSET)) / (count - 1));
  const y = (v) => PAD.top + plotHeight * (1 - Math.min(v, top) / top);
  const parts = [
    svg("line", { x1: PAD.left, y1: y(0), x2: WIDTH - PAD.right, y2: y(0), class: "axis" }),
    svg("text", { x: PAD.left - 4, y: y(top) + 4, "text-anchor": "end", class: "tick" }, (tick ?? format)(top)),
    svg("text", { x: PAD.left - 4, y: y(0), "text-anchor": "end", class: "tick" }, (tick ?? format)(0)),
  ];
  drifting.forEach((bad, i) => {
    if (bad) parts.push(svg("rect", { x: x(i) - INSET, y: PAD.top, width: 2 * INSET, height: plotHeight, class: "drifting-window" }));
  });
  for (const s of series) {
    if (s.kind === "bars") {
      const width = Math.max(1, Math.min(2 * INSET - 2, plotWidth / count - 2));
      s.values.forEach((v, i) => parts.push(svg("rect", { x: x(i) - width / 2, y: y(v), width, height: y(0) - y(v), class: "bar" })));
      continue;
    }
    const points = s.values.map((v, i) => (v === null ? null : `${x(i).toFixed(1)},${y(v).toFixed(1)}`)).filter(Boolean);
    if (points.length) parts.push(svg("polyline", { points: points.join(" "), class: s.kind === "threshold" ? "threshold" : "line" }));
  }
  const last = series.map((s) => s.values.at(-1)).filter((v) => v !== null && v !== undefined);
  const label = `${title}: ${count} windows, latest ${last.length ? last.map(format).join(" against its threshold ") : "nothing yet"}`;
  return el("figure", { class: "chart" },
    svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": label }, svg("title", {}, label), ...parts),
    el("figcaption", {}, title));
}

function windowTable(windows) {
  const rows = [...windows].reverse().map((w) => el("tr", { class: w.drift && w.drift.drifting ? "drifting" : null },
    el("th", { scope: "row" }, formatTime(w.end_time)),
    el("td", {}, String(w.predictions)),
    el("td", {}, rate(w.ood_rate)),
    el("td", {}, rate(w.abstention_rate)),
    el("td", {}, w.label_distance === null || w.label_distance === undefined ? "–" : w.label_distance.toFixed(3)),
    el("td", {}, w.drift ? `${w.drift.statistic.toFixed(3)} / ${w.drift.threshold.toFixed(3)}${w.drift.drifting ? " drifting" : ""}` : "–")));
  return el("details", {}, el("summary", {}, "Windows as a table"),
    el("div", { class: "scroll" }, el("table", { class: "windows" },
      el("caption", { class: "visually-hidden" }, "Monitoring windows, newest first"),
      el("thead", {}, el("tr", {}, ["window end", "predictions", "OOD rate", "abstained", "label distance",
        "drift statistic / threshold"].map((t) => el("th", { scope: "col" }, t)))),
      el("tbody", {}, rows))));
}
