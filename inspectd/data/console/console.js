// inspectd console: products, the live NG-first feed (Server-Sent Events) and feedback, with no build step.
// Every value from the daemon is set as text (frame ids and products come from producers), never as HTML.
"use strict";

const API = "/console/api";
const state = { csrf: sessionStorage.getItem("inspectd.csrf"), signedIn: false, frames: new Map(), products: [],
  feedbackOn: false, open: null, keep: { NG: 100, OK: 20 } };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

const fmt = (x, digits = 4) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));
const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)} %`);
const when = (ts) => (ts ? new Date(ts * 1000).toLocaleTimeString() : "–");

async function call(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const response = await fetch(API + path, { method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    if (response.status === 401 && method !== "GET") setSignedIn(false);
    throw new Error(data.error || `${response.status} ${response.statusText}`);
  }
  return data;
}

// ------------------------------------------------------------------------------------------- session
function setSignedIn(on) {
  state.signedIn = on && !!state.csrf;
  document.getElementById("sign-in").hidden = state.signedIn;
  document.getElementById("sign-out").hidden = !state.signedIn;
  document.getElementById("who").textContent = state.signedIn ? "signed in" : "read-only";
  document.body.classList.toggle("signed-in", state.signedIn);
  renderFeed();
}

async function signIn(event) {
  event.preventDefault();
  const input = document.getElementById("login-token");
  const error = document.getElementById("login-error");
  error.textContent = "";
  try {
    const data = await call("POST", "/session", { token: input.value });
    state.csrf = data.csrf;
    sessionStorage.setItem("inspectd.csrf", data.csrf);
    input.value = "";
    document.getElementById("login").close();
    setSignedIn(true);
  } catch (exc) {
    error.textContent = exc.message;
  }
}

async function signOut() {
  try { await call("DELETE", "/session"); } catch (exc) { /* signed out anyway */ }
  state.csrf = null;
  sessionStorage.removeItem("inspectd.csrf");
  setSignedIn(false);
}

// ------------------------------------------------------------------------------------------- products
async function setTarget(product, value) {
  try {
    const view = await call("PUT", `/products/${encodeURIComponent(product)}/feedback-target`, { target: value });
    const i = state.products.findIndex((p) => p.id === product);
    if (i >= 0) state.products[i] = view;
  } catch (exc) {
    alertBar(`could not set where false alarms go: ${exc.message}`);
  }
  renderProducts();
}

function renderProducts() {
  const box = document.getElementById("products");
  box.replaceChildren();
  const filter = document.getElementById("filter-product");
  const chosen = filter.value;
  filter.replaceChildren(el("option", { value: "", text: "all" }));
  for (const p of state.products) {
    filter.append(el("option", { value: p.id, text: p.id, selected: p.id === chosen ? "selected" : null }));
    const stats = p.stats || {};
    const dead = Object.entries(stats.dead_letters || {}).map(([r, n]) => `${r} ${n}`).join(", ") || "none";
    const select = el("select", { class: "target", "aria-label": `false alarms of ${p.id} go to`,
      disabled: !state.signedIn || !p.feedback_target, onchange: (e) => setTarget(p.id, e.target.value) },
      el("option", { value: "references", text: "references" }),
      el("option", { value: "holdout", text: "calibration holdout" }));
    select.value = p.feedback_target || "references";
    const build = p.build ? el("div", {}, el("progress", { max: "1", value: String(p.build.fraction) }),
      el("span", { class: "muted", text: `${Math.round(100 * p.build.fraction)} % ${p.build.note || ""}` })) : null;
    box.append(el("article", { class: "product", id: `product-${p.id}`, "data-product": p.id },
      el("h3", {}, el("span", { text: p.id }), el("span", { class: `status ${p.status}`, text: p.status || "?" })),
      build,
      el("dl", {},
        el("dt", { text: "version" }), el("dd", { class: "version", text: p.version ?? "–" }),
        el("dt", { text: "detector" }), el("dd", { text: `${p.detector ?? "–"}${p.model ? ` (${p.model})` : ""}` }),
        el("dt", { text: "k (shots)" }), el("dd", { class: "shots", text: p.shots ?? "–" }),
        el("dt", { text: "threshold" }), el("dd", { class: "threshold", text: fmt(p.threshold) }),
        el("dt", { text: "calibrated" }), el("dd", { class: "calibration", text: p.calibration ?? "–" }),
        el("dt", { text: `NG last ${stats.last_n ?? 0}` }), el("dd", { class: "ng-rate", text: pct(stats.ng_rate_last_n) }),
        el("dt", { text: "NG last hour" }),
        el("dd", { text: `${pct(stats.ng_rate_hour)} of ${stats.frames_hour ?? 0}` }),
        el("dt", { text: "dead letters" }), el("dd", { class: "dead", text: dead }),
        el("dt", { text: "false alarms to" }), el("dd", {}, select)),
      p.error ? el("p", { class: "error", text: p.error }) : null));
  }
}

async function loadOverview() {
  const data = await call("GET", "/overview");
  state.products = data.products;
  state.feedbackOn = data.feedback;
  state.keep = { NG: data.review.keep_ng, OK: data.review.keep_ok };
  document.getElementById("demo").hidden = !data.demo_weights;
  const review = data.review;
  document.getElementById("review-note").textContent = review.keeping
    ? `review buffer: newest ${review.keep_ng} NG and ${review.keep_ok} OK frames at ≤ ${review.max_side} px `
      + `(${review.kept} held; at most ${review.ng_per_s} NG and ${review.ok_per_s} OK frames a second are kept`
      + `${Object.keys(review.skipped).length ? `; not kept: ${Object.entries(review.skipped).map(([k, n]) => `${n} ${k}`).join(", ")}` : ""})`
    : "this daemon keeps no frames for review (console.review: off)";
  document.getElementById("feedback-note").textContent = data.feedback
    ? `confirmed defects go to ${data.feedback_dir} (folder eval layout)`
    : "feedback is off: set console.feedback_dir or registry.references_root";
  const lines = document.getElementById("filter-line");
  const chosen = lines.value;
  lines.replaceChildren(el("option", { value: "", text: "all" }),
    ...data.lines.map((l) => el("option", { value: l, text: l, selected: l === chosen ? "selected" : null })));
  renderProducts();
}

// ------------------------------------------------------------------------------------------- feed
// a frame's feedback as its card says it ("pending": an operator's action under way, maybe at another console)
function feedbackText(fb) {
  if (fb.action === "pending") return "feedback under way…";
  return fb.action === "false_alarm" ? `marked good → ${fb.target}` : `confirmed defect (${fb.label})`;
}

function frameCard(f) {
  const thumb = el("img", { src: `${API}/frames/${f.id}/thumb.jpg`, alt: `${f.product} ${f.frame_id}`,
    loading: "lazy", onclick: () => openDetail(f.id) });
  const card = el("article", { class: `frame-card ${f.verdict}`, "data-id": f.id, "data-frame-id": f.frame_id,
    "data-product": f.product }, thumb,
    el("div", { class: "meta" },
      el("strong", { class: `score ${f.verdict}`, text: `${f.verdict} ${fmt(f.score)} ${f.score >= f.threshold ? "≥" : "<"} ${fmt(f.threshold)}` }),
      el("span", { text: `${f.product} · ${f.line}` }),
      el("span", { class: "muted frame-id", text: `${f.frame_id} · ${when(f.ts)} · v${f.state_version}` })));
  if (f.feedback) {
    card.append(el("div", { class: "done", text: feedbackText(f.feedback) }));
  } else if (state.signedIn && state.feedbackOn) {
    card.append(el("div", { class: "buttons" },
      el("button", { type: "button", class: "btn-false-alarm", text: "False alarm",
        onclick: (e) => sendFeedback(f.id, { action: "false_alarm" }, e.target) }),
      el("button", { type: "button", class: "btn-defect", text: "Defect",
        onclick: (e) => sendFeedback(f.id, { action: "defect", label: "defect" }, e.target) })));
  }
  return card;
}

function renderFeed() {
  const line = document.getElementById("filter-line").value;
  const product = document.getElementById("filter-product").value;
  const frames = [...state.frames.values()].filter((f) => (!line || f.line === line) && (!product || f.product === product))
    .sort((a, b) => (b.kept_at || 0) - (a.kept_at || 0));
  for (const verdict of ["NG", "OK"]) {
    const box = document.getElementById(`feed-${verdict.toLowerCase()}`);
    const chosen = frames.filter((f) => f.verdict === verdict);
    box.replaceChildren(...chosen.map(frameCard));
    if (!chosen.length) box.append(el("p", { class: "muted", text: `no ${verdict} frames kept` }));
  }
}

async function loadFrames() {
  const data = await call("GET", "/frames?limit=500");
  state.frames = new Map(data.frames.map((f) => [f.id, f]));
  renderFeed();
}

function openDetail(id) {
  const f = state.frames.get(id);
  if (!f) return;
  state.open = id;
  document.getElementById("detail-title").textContent = `${f.product} · ${f.frame_id} · ${f.verdict}`;
  document.getElementById("detail-overlay").src = `${API}/frames/${id}/overlay.jpg`;
  const mask = document.getElementById("detail-mask");
  mask.hidden = !f.has_mask;
  document.getElementById("detail-mask-caption").textContent = f.has_mask ? "raw mask (255 = mask scale)" : "no mask";
  if (f.has_mask) mask.src = `${API}/frames/${id}/mask.png`;
  const info = document.getElementById("detail-info");
  info.replaceChildren();
  for (const [k, v] of [["score", fmt(f.score)], ["threshold", fmt(f.threshold)], ["verdict", f.verdict],
    ["time", when(f.ts)], ["frame id", f.frame_id], ["entry id", f.entry_id], ["line", f.line],
    ["detector", f.detector], ["state version", f.state_version]]) info.append(el("dt", { text: k }), el("dd", { text: v }));
  const can = state.signedIn && state.feedbackOn && !f.feedback;
  for (const b of ["detail-false-alarm", "detail-defect"]) document.getElementById(b).disabled = !can;
  document.getElementById("detail-status").textContent = !f.feedback ? ""
    : f.feedback.action === "pending" ? feedbackText(f.feedback) : `feedback given: ${f.feedback.action}`;
  document.getElementById("detail").showModal();
}

async function sendFeedback(id, body, button) {
  const status = document.getElementById("detail-status");
  status.textContent = "saving and rebuilding…";
  const buttons = [button, document.getElementById("detail-false-alarm"), document.getElementById("detail-defect")];
  for (const b of buttons) if (b) b.disabled = true;  // one tap, one action
  try {
    const data = await call("POST", `/frames/${id}/feedback`, body);
    const f = state.frames.get(id);
    if (f) f.feedback = data.feedback;
    status.textContent = `saved (${data.feedback.files.length} file(s))`;
    const i = state.products.findIndex((p) => p.id === data.product.id);
    if (i >= 0) state.products[i] = data.product;
    renderProducts();
    renderFeed();
    loadFeedback();
  } catch (exc) {
    status.textContent = `failed: ${exc.message}`;
    alertBar(`feedback failed: ${exc.message}`);
    for (const b of buttons) if (b) b.disabled = false;
  }
}

function alertBar(text) {
  document.getElementById("who").textContent = text;
}

// ------------------------------------------------------------------------------------------- feedback log
async function loadFeedback() {
  const data = await call("GET", "/feedback");
  const list = document.getElementById("feedback");
  list.replaceChildren();
  for (const r of data.feedback.slice().reverse()) {
    const undo = el("button", { type: "button", class: "btn-undo", text: "Undo", disabled: r.undone || !state.signedIn,
      onclick: async () => {
        try { await call("POST", `/feedback/${r.id}/undo`); await Promise.all([loadOverview(), loadFrames(), loadFeedback()]); }
        catch (exc) { alertBar(`undo failed: ${exc.message}`); }
      } });
    list.append(el("li", { class: r.undone ? "undone" : "", "data-feedback": r.id },
      el("span", { text: when(r.at) }),
      el("strong", { text: r.action === "false_alarm" ? `false alarm → ${r.target}` : `defect (${r.label})` }),
      el("span", { text: `${r.product} / ${r.frame_id}` }),
      el("span", { class: "muted", text: r.version_after ? `v${r.version_after}, threshold ${fmt(r.threshold_after)}` : "" }),
      el("span", { class: "spacer" }), undo));
  }
}

// ------------------------------------------------------------------------------------------- live
const RETRY_MIN_MS = 2000, RETRY_MAX_MS = 30000;
function connect(retryMs = RETRY_MIN_MS) {
  const live = document.getElementById("live");
  const source = new EventSource(`${API}/events`);
  source.onopen = () => {
    live.textContent = "live"; live.className = "pill on"; live.title = "";
    if (retryMs > RETRY_MIN_MS) loadFrames().catch(() => {});  // frames kept while the stream was refused
    retryMs = RETRY_MIN_MS;
  };
  source.onerror = () => {
    live.className = "pill off";
    if (source.readyState !== EventSource.CLOSED) { live.textContent = "reconnecting"; return; }
    // the browser gives up on an answer that is no event stream: the session ended (401), or the live view was
    // refused (429: this address holds its live views already; 503: the daemon's are all taken)
    call("GET", "/session").then((session) => {
      if (session.reads_open || session.signed_in) throw new Error("refused");
      live.textContent = "signed out"; live.title = "";
      setSignedIn(false);
      document.getElementById("login").showModal();
      waitFor(() => state.signedIn).then(() => connect(RETRY_MIN_MS * 2));  // *2: reload the frames missed
    }).catch(() => {
      live.textContent = "live view refused: retrying";
      live.title = "too many live views open: close other console tabs (at most 4 per address)";
      setTimeout(() => connect(Math.min(retryMs * 2, RETRY_MAX_MS)), retryMs);
    });
  };
  source.addEventListener("frame", (e) => {
    const f = JSON.parse(e.data);
    state.frames.set(f.id, f);
    trimFrames();
    renderFeed();
    scheduleOverview();
  });
  source.addEventListener("feedback", (e) => {
    const f = JSON.parse(e.data);
    state.frames.set(f.id, f);
    renderFeed();
  });
  source.addEventListener("product", () => scheduleOverview());
}

// the page holds no more frames than the daemon keeps (a phone left open for a shift stays light)
function trimFrames() {
  for (const verdict of ["NG", "OK"]) {
    const limit = verdict === "NG" ? state.keep.NG : state.keep.OK;
    const chosen = [...state.frames.values()].filter((f) => f.verdict === verdict)
      .sort((a, b) => (a.kept_at || 0) - (b.kept_at || 0));
    for (const f of chosen.slice(0, Math.max(0, chosen.length - limit))) state.frames.delete(f.id);
  }
}

let overviewTimer = null;
function scheduleOverview() {
  if (overviewTimer) return;
  overviewTimer = setTimeout(() => { overviewTimer = null; loadOverview().catch(() => {}); }, 500);
}

async function start() {
  document.getElementById("sign-in").addEventListener("click", () => document.getElementById("login").showModal());
  document.getElementById("sign-out").addEventListener("click", signOut);
  document.getElementById("login-form").addEventListener("submit", signIn);
  document.getElementById("login-cancel").addEventListener("click", () => document.getElementById("login").close());
  document.getElementById("filter-line").addEventListener("change", renderFeed);
  document.getElementById("filter-product").addEventListener("change", renderFeed);
  document.getElementById("detail-false-alarm").addEventListener("click", () =>
    sendFeedback(state.open, { action: "false_alarm" }));
  document.getElementById("detail-defect").addEventListener("click", () =>
    sendFeedback(state.open, { action: "defect", label: document.getElementById("detail-label").value }));
  const session = await call("GET", "/session");
  document.getElementById("login-hint").textContent = `Paste ${session.token_hint}. It is sent once; the browser keeps a session cookie.`;
  setSignedIn(session.signed_in);
  if (!session.reads_open && !session.signed_in) {
    document.getElementById("login").showModal();
    return waitForSignIn();
  }
  await boot();
}

async function waitFor(condition) {
  while (!condition()) await new Promise((r) => setTimeout(r, 300));
}

async function waitForSignIn() {
  await waitFor(() => state.signedIn);
  await boot();
}

async function boot() {
  // each panel on its own: one that cannot load (e.g. the review store's Redis is down) leaves the others working
  const loads = await Promise.allSettled([loadOverview(), loadFrames(), loadFeedback()]);
  const failed = loads.filter((r) => r.status === "rejected").map((r) => r.reason.message);
  if (failed.length) alertBar(`some panels could not load: ${failed.join("; ")}`);
  connect();
  setInterval(() => loadOverview().catch(() => {}), 5000);
}

start().catch((exc) => alertBar(`console failed to start: ${exc.message}`));
