// The Quiesce console. Plain JavaScript, no build step, nothing loaded from elsewhere.
//
// Rules this file keeps:
// - Every value from the API is put on the page with textContent or DOM APIs, never
//   innerHTML: run metadata, event data and task output are attacker-controlled.
// - The API token lives in this tab's sessionStorage only and travels only in the
//   Authorization header: never in a URL, never in a cookie. That is why the event
//   stream is read with fetch() and a body reader, not EventSource (which cannot
//   send a header).

const TOKEN_KEY = "quiesce.token";
const POLL_MS = 2000;
const TERMINAL_EVENTS = new Set(["run_succeeded", "run_failed", "run_cancelled"]);
const TERMINAL_STATUSES = new Set(["succeeded", "failed", "cancelled"]);
const KNOWN_BADGES = new Set([
  "starting", "ready", "draining", "stopped",
  "queued", "running", "succeeded", "failed", "cancelled",
]);

const $ = (id) => document.getElementById(id);

class Unauthorized extends Error {}

// --- the API -----------------------------------------------------------------------

function authHeaders(extra = {}) {
  const headers = { Accept: "application/json", ...extra };
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

async function detailOf(response) {
  try {
    const body = await response.json();
    return String(body.detail ?? response.statusText);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function api(path, { method = "GET", headers = {}, signal } = {}) {
  const response = await fetch(path, {
    method,
    headers: authHeaders(headers),
    credentials: "omit",
    cache: "no-store",
    signal,
  });
  if (response.status === 401) throw new Unauthorized(await detailOf(response));
  return response;
}

async function getJson(path) {
  const response = await api(path);
  if (!response.ok) throw new Error(`${path}: ${await detailOf(response)}`);
  return response.json();
}

// --- DOM helpers (text only) ---------------------------------------------------------

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function row(...cells) {
  const tr = document.createElement("tr");
  for (const content of cells) {
    const td = document.createElement("td");
    if (content instanceof Node) td.append(content);
    else td.textContent = content ?? "";
    tr.append(td);
  }
  return tr;
}

function badge(node, value) {
  node.textContent = value;
  node.className = KNOWN_BADGES.has(value) ? `badge badge-${value}` : "badge";
}

function runLink(runId) {
  const link = el("a", runId, "mono");
  link.href = `/console/runs/${encodeURIComponent(runId)}`;
  return link;
}

function when(value) {
  return value ? String(value).replace("T", " ").replace(/\.\d+/, "") : "";
}

function age(seconds) {
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function pretty(value) {
  return el("pre", JSON.stringify(value, null, 2));
}

function showMessage(text) {
  const node = $("message");
  node.textContent = text ?? "";
  node.hidden = !text;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// --- sign-in -------------------------------------------------------------------------

function signIn(reason) {
  $("overview").hidden = true;
  $("run").hidden = true;
  $("sign-out").hidden = true;
  showMessage(reason);
  $("sign-in").hidden = false;
  $("token").focus();
}

$("sign-in").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  $("token").value = "";
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  $("sign-in").hidden = true;
  showMessage("");
  start();
});

$("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  location.assign("/console");
});

function failed(error) {
  if (error instanceof Unauthorized) signIn(error.message);
  else showMessage(String(error.message ?? error));
}

// --- the replica ---------------------------------------------------------------------

function renderDrain(drain) {
  if (!drain) return "not draining";
  const parts = [
    `${drain.trigger ?? "drain"} since ${when(drain.started_at)}`,
    `${drain.active_now} of ${drain.active_at_start} runs still running`,
    drain.finished ? "finished" : `the rest is cancelled at ${when(drain.cancel_at)}`,
  ];
  if (drain.cancelled) parts.push(`${drain.cancelled} cancelled`);
  if (drain.left_running) parts.push(`${drain.left_running} left for a peer to reap`);
  return parts.join("; ");
}

async function refreshOverview() {
  const [state, runs] = await Promise.all([getJson("/admin/state"), getJson("/admin/runs")]);
  $("worker").textContent = state.worker_id;
  badge($("state"), state.state);
  const meter = $("capacity-meter");
  meter.max = state.max_active_runs;
  meter.high = state.max_active_runs * 0.8;
  meter.value = state.active_count;
  $("capacity").textContent = `${state.active_count} of ${state.max_active_runs} runs`;
  $("drain").textContent = renderDrain(state.drain);
  $("active").replaceChildren(
    ...state.active_runs.map((run) => row(runLink(run.run_id), run.task, age(run.age_seconds))),
  );
  $("recent-note").textContent = `(the last ${runs.limit} this replica finished)`;
  $("recent").replaceChildren(
    ...runs.finished.map((run) => {
      const status = el("span");
      badge(status, run.status);
      if (run.reason && run.reason !== run.status) status.textContent += ` (${run.reason})`;
      return row(runLink(run.run_id), run.task, status, when(run.created_at), when(run.finished_at));
    }),
  );
}

async function showOverview() {
  await refreshOverview();
  $("overview").hidden = false;
  for (;;) {
    await sleep(POLL_MS);
    try {
      await refreshOverview();
      showMessage("");
    } catch (error) {
      if (error instanceof Unauthorized) throw error;
      showMessage(`Cannot reach the replica: ${error.message}`);
    }
  }
}

// --- one run -------------------------------------------------------------------------

function fact(list, name, value) {
  if (value === undefined || value === null || value === "") return;
  list.append(el("dt", name));
  const dd = document.createElement("dd");
  dd.append(value instanceof Node ? value : el("span", value));
  list.append(dd);
}

function renderRecord(record) {
  badge($("run-status"), record.status);
  const facts = $("run-facts");
  facts.replaceChildren();
  fact(facts, "Task", record.task);
  fact(facts, "Worker", record.worker_id);
  if (record.max_attempts > 1) fact(facts, "Attempt", `${record.attempt} of ${record.max_attempts}`);
  fact(facts, "Created", when(record.created_at));
  fact(facts, "Updated", when(record.updated_at));
  fact(facts, "Finished", when(record.finished_at));
  fact(facts, "Timeout", `${record.timeout_seconds} s`);
  fact(facts, "Callback", record.callback_url);
  if (record.metadata && Object.keys(record.metadata).length) {
    fact(facts, "Metadata", pretty(record.metadata));
  }
  if (record.output !== undefined && record.output !== null) fact(facts, "Output", pretty(record.output));
  if (record.error) fact(facts, "Error", pretty(record.error));
  $("cancel").disabled = TERMINAL_STATUSES.has(record.status);
}

async function loadRecord(runId) {
  renderRecord(await getJson(`/v1/runs/${encodeURIComponent(runId)}`));
}

function addEvent(event) {
  const item = el("li");
  const type = el("span", event.type, "badge");
  item.append(el("time", when(event.created_at), "muted"), " ", type, " ");
  item.append(el("code", JSON.stringify(event.data)));
  $("events").append(item);
}

// One Server-Sent Events frame: its id, event, data and retry fields.
function parseFrame(text) {
  const frame = { data: null };
  for (const line of text.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") frame.data = frame.data === null ? value : `${frame.data}\n${value}`;
    else if (field === "id") frame.id = value;
    else if (field === "event") frame.event = value;
    else if (field === "retry" && /^\d+$/.test(value)) frame.retry = Number(value);
  }
  return frame;
}

// Follow the run's events: replay, then live. A replica that drains ends the stream
// early with a retry hint; resume from the last cursor (Last-Event-ID) after it.
async function follow(runId) {
  const path = `/v1/runs/${encodeURIComponent(runId)}/events/stream`;
  let cursor = null;
  for (;;) {
    const headers = { Accept: "text/event-stream" };
    if (cursor) headers["Last-Event-ID"] = cursor;
    const response = await api(path, { headers });
    if (!response.ok) {
      $("stream-state").textContent = `(stream refused: ${await detailOf(response)}; retrying)`;
      await sleep(1000 * Number(response.headers.get("Retry-After") ?? 2));
      continue;
    }
    $("stream-state").textContent = "(live)";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let retryMs = 1000;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = (buffer + value).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const frame = parseFrame(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (frame.retry !== undefined) retryMs = frame.retry;
        if (frame.data === null) continue;
        if (frame.id) cursor = frame.id;
        const event = JSON.parse(frame.data);
        addEvent(event);
        if (TERMINAL_EVENTS.has(event.type)) {
          $("stream-state").textContent = "(ended)";
          await reader.cancel();
          await loadRecord(runId);
          return;
        }
      }
    }
    $("stream-state").textContent = "(reconnecting)";
    await sleep(retryMs);
  }
}

async function cancelRun(runId) {
  const response = await api(`/v1/runs/${encodeURIComponent(runId)}/cancel`, { method: "POST" });
  if (response.ok) {
    renderRecord(await response.json());
    showMessage("");
  } else {
    showMessage(`Not cancelled: ${await detailOf(response)}`);
  }
}

async function showRun(runId) {
  $("run-id").textContent = runId;
  $("events").replaceChildren();
  await loadRecord(runId);
  $("run").hidden = false;
  $("cancel").onclick = () => cancelRun(runId).catch(failed);
  await follow(runId);
}

// --- start ---------------------------------------------------------------------------

function start() {
  $("sign-out").hidden = !sessionStorage.getItem(TOKEN_KEY);
  const match = location.pathname.match(/^\/console\/runs\/([^/]+)\/?$/);
  const page = match ? showRun(decodeURIComponent(match[1])) : showOverview();
  page.catch(failed);
}

start();
