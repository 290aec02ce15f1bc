// "Try it": an image (dropped, pasted, picked or from the webcam) against one or several heads, side by side.

import { listAll, postForm } from "./api.js";
import { acceptDrops, el, scoreBar } from "./widgets.js";

const $ = (id) => document.getElementById(id);
let image = null;  // the Blob being classified
let stream = null;  // the webcam's MediaStream while it is on

export function setUpTry() {
  $("try-file").addEventListener("change", (event) => {
    if (event.target.files[0]) useImage(event.target.files[0]);
    event.target.value = "";
  });
  acceptDrops($("try-drop"), (files) => { if (files[0]) useImage(files[0]); });
  document.addEventListener("paste", (event) => {
    if ($("page-try").hidden) return;
    const file = [...event.clipboardData.files].find((f) => f.type.startsWith("image/"));
    if (file) useImage(file);
  });
  $("webcam-start").addEventListener("click", startWebcam);
  $("webcam-stop").addEventListener("click", stopWebcam);
  $("webcam-snap").addEventListener("click", snap);
  $("try-heads").addEventListener("change", () => predict());
}

/** Refs to offer: each head's latest, every version, every alias. ``#try?name@2`` ticks one. */
export async function showTry() {
  const wanted = decodeURIComponent(location.hash.split("?")[1] || "");
  const box = $("try-heads");
  const ticked = new Set([...box.querySelectorAll("input:checked")].map((input) => input.value));
  if (wanted) ticked.add(wanted);
  let heads;
  try {
    heads = await listAll("heads");
  } catch (error) {
    $("try-error").textContent = `Your heads could not be listed: ${error.message}`;
    return;
  }
  if (heads.length === 0) {
    box.replaceChildren(el("p", {}, "No heads yet: ", el("a", { href: "#new" }, "teach a new model"), " first."));
    return;
  }
  if (ticked.size === 0) ticked.add(heads[0].name.replace(/^heads\//, ""));
  box.replaceChildren(...heads.map((head) => {
    const name = head.name.replace(/^heads\//, "");
    const refs = [[name, `${name} (latest, v${head.latest_version})`],
      ...Object.entries(head.aliases).filter(([a]) => a !== "latest").map(([a, v]) => [`${name}:${a}`, `${name}:${a} (v${v})`]),
      ...head.versions.map((v) => [`${name}@${v.version}`, `${name}@${v.version}`])];
    return el("div", { class: "ref-group", role: "group", "aria-label": name }, refs.map(([ref, label]) => {
      const id = `try-ref-${ref.replace(/[^a-z0-9-]/g, "_")}`;
      return el("span", { class: "check" },
        el("input", { type: "checkbox", id, value: ref, checked: ticked.has(ref) }),
        el("label", { for: id }, label));
    }));
  }));
  if (image) await predict();
}

function useImage(blob) {
  image = blob;
  const preview = $("try-image");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(blob);
  $("try-preview").hidden = false;
  predict();
}

async function predict() {
  const refs = [...$("try-heads").querySelectorAll("input:checked")].map((input) => input.value);
  const error = $("try-error");
  error.textContent = "";
  if (!image) return;
  if (refs.length === 0) {
    error.textContent = "Tick at least one head to ask.";
    return;
  }
  const body = new FormData();
  body.append("files", image, image.name || "image.png");
  for (const ref of refs) body.append("heads", ref);
  body.append("top_k", "5");
  $("try-results").setAttribute("aria-busy", "true");
  try {
    const answer = await postForm("predict:upload", body);
    const [prediction] = answer.predictions;
    $("try-results").replaceChildren(...prediction.heads.map((head, i) =>
      el("section", { class: "card result", "aria-label": `answer of ${refs[i]}` },
        el("h2", {}, refs[i], el("small", {}, ` version ${head.version}`)),
        el("p", { class: "top-label" }, head.top[0].label),
        el("ol", { class: "scores" }, head.top.map((top) => scoreBar(top.label, top.score))))));
  } catch (failure) {
    error.textContent = failure.message;
  } finally {
    $("try-results").removeAttribute("aria-busy");
  }
}

async function startWebcam() {
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" } });
  } catch (failure) {
    $("try-error").textContent = `The webcam could not be opened: ${failure.message}`;
    return;
  }
  const video = $("webcam-video");
  const button = $("webcam-snap");
  button.disabled = true;  // until the first frame: a picture before it would be empty
  video.addEventListener("playing", () => { button.disabled = false; button.focus(); }, { once: true });
  video.srcObject = stream;
  $("webcam").hidden = false;
}

function stopWebcam() {
  if (stream) for (const track of stream.getTracks()) track.stop();
  stream = null;
  $("webcam").hidden = true;
}

function snap() {
  const video = $("webcam-video");
  const canvas = el("canvas", { width: video.videoWidth, height: video.videoHeight });
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob((blob) => useImage(new File([blob], "webcam.jpg", { type: "image/jpeg" })), "image/jpeg", 0.92);
}
