// The page's frame: learn whether the service wants a key, sign in, and show one page per #hash.

import { ApiError, apiKey, call, setApiKey } from "./api.js";
import { showHeads } from "./heads.js";
import { setUpLabel, showLabel } from "./label.js";
import { setUpNewModel, showNewModel } from "./train.js";
import { setUpTry, showTry } from "./try.js";

const PAGES = { heads: showHeads, new: showNewModel, try: showTry, label: showLabel };
let needsKey = false;
let signedIn = false;

const $ = (id) => document.getElementById(id);

/** Open mode answers /v1 without a key; keys mode answers 401, and the page asks for one. */
async function checkAccess(key) {
  try {
    await call("backbones", { key });
    return null;
  } catch (error) {
    if (error instanceof ApiError && (error.status === 401 || error.status === 403)) return error;
    throw error;
  }
}

function showOnly(id) {
  for (const page of document.querySelectorAll(".page")) page.hidden = page.id !== id;
  $("loading").hidden = true;
}

async function route() {
  document.querySelector("nav").hidden = !signedIn;
  if (!signedIn) {
    showOnly("page-signin");
    $("api-key").focus();
    return;
  }
  const name = location.hash.slice(1).split("?")[0] || "heads";
  const show = PAGES[name] || showHeads;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.page === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  showOnly(`page-${PAGES[name] ? name : "heads"}`);
  await show();
  $("main").focus({ preventScroll: true });
}

async function signIn(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  const error = $("signin-error");
  error.textContent = "";
  if (!key) {
    error.textContent = "Enter your API key.";
    return;
  }
  const refused = await checkAccess(key);
  if (refused) {
    error.textContent = `The service refused this key: ${refused.message}`;
    return;
  }
  setApiKey(key);
  $("api-key").value = "";
  signedIn = true;
  $("sign-out").hidden = false;
  await route();
}

function signOut() {
  setApiKey("");
  signedIn = false;
  $("sign-out").hidden = true;
  route();
}

async function start() {
  $("signin-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  window.addEventListener("hashchange", route);
  setUpNewModel();
  setUpTry();
  setUpLabel();
  try {
    needsKey = (await checkAccess("")) !== null;
    signedIn = !needsKey || (apiKey() !== "" && (await checkAccess(apiKey())) === null);
  } catch (error) {
    $("loading").textContent = `The service could not be reached: ${error.message}. Reload the page to try again.`;
    return;
  }
  $("sign-out").hidden = !(needsKey && signedIn);
  await route();
}

start();
