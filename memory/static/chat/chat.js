// The chat page (/chat/): a person's view of the memory over the REST API and the session
// WebSocket (docs/api.md, "WebSocket"). Plain script, no build step, no dependency.
//
// The API key lives in this tab's sessionStorage only: REST calls send it as a Bearer header,
// the WebSocket offers it as the `bearer.<key>` subprotocol (a browser cannot set headers on a
// socket), so it never appears in a URL. Each turn is first a `memory.query` (its partial and
// final frames fill that turn's panel), then a `messages.add`: what a turn recalls is what
// came before it.
"use strict";

const KEY_STORAGE = "memfuse.apiKey";
const AGENT_NAME = "chat";
const $ = (selector) => document.querySelector(selector);

let apiKey = null;
let socket = null;
let sessionId = null;
let turnCount = 0;

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("#error").hidden = true;
  $("#error").textContent = "";
}

function status(text) {
  $("#status").textContent = text;
}

// One REST call; resolves to the envelope's `data`, rejects with its `message`.
async function api(method, path, body) {
  const response = await fetch(`/api/v1/${path}`, {
    method,
    headers: { Authorization: `Bearer ${apiKey}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let envelope = null;
  try {
    envelope = await response.json();
  } catch (error) {
    throw new Error(`The server answered ${response.status} without a JSON body`);
  }
  if (!response.ok || envelope.status !== "success") {
    const error = new Error(envelope.message || `The server answered ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return envelope.data;
}

function option(value, label) {
  const element = document.createElement("option");
  element.value = value;
  element.textContent = label;
  return element;
}

async function connect(event) {
  if (event) event.preventDefault();
  clearError();
  apiKey = $("#api-key").value.trim();
  sessionStorage.setItem(KEY_STORAGE, apiKey);
  try {
    await loadUsers();
    $("#pickers").hidden = false;
    status("Key accepted: pick or create a user, then a session.");
  } catch (error) {
    $("#pickers").hidden = true;
    $("#chat").hidden = true;
    status("Not connected.");
    showError(`Could not connect: ${error.message}`);
  }
}

async function loadUsers() {
  const { users } = await api("GET", "users");
  const select = $("#user-select");
  select.replaceChildren(...users.map((user) => option(user.id, user.name)));
  if (users.length) await loadSessions(select.value);
}

async function loadSessions(userId) {
  const { sessions } = await api("GET", `sessions?user_id=${encodeURIComponent(userId)}`);
  $("#session-select").replaceChildren(...sessions.map((session) => option(session.id, session.name)));
}

async function useUser(event) {
  event.preventDefault();
  clearError();
  try {
    const name = $("#new-user").value.trim();
    if (name) {
      const { user } = await api("POST", "users", { name });
      await loadUsers();
      $("#user-select").value = user.id;
      $("#new-user").value = "";
    }
    await loadSessions($("#user-select").value);
  } catch (error) {
    showError(error.message);
  }
}

// The tenant's "chat" agent, created on first use; a user key (which may not create agents)
// uses the first agent of its tenant.
async function chatAgent() {
  const { agents } = await api("GET", "agents");
  const named = agents.find((agent) => agent.name === AGENT_NAME);
  if (named) return named;
  try {
    return (await api("POST", "agents", { name: AGENT_NAME })).agent;
  } catch (error) {
    if (error.status === 403 && agents.length) return agents[0];
    throw error;
  }
}

async function openSession(event) {
  event.preventDefault();
  clearError();
  try {
    const userId = $("#user-select").value;
    if (!userId) throw new Error("Pick or create a user first");
    const name = $("#new-session").value.trim();
    let id = $("#session-select").value;
    let label = $("#session-select").selectedOptions[0]?.textContent;
    if (name) {
      const agent = await chatAgent();
      const { session } = await api("POST", "sessions", { user_id: userId, agent_id: agent.id, name });
      await loadSessions(userId);
      $("#new-session").value = "";
      [id, label] = [session.id, session.name];
    }
    if (!id) throw new Error("Pick or create a session first");
    openSocket(id, label);
  } catch (error) {
    showError(error.message);
  }
}

function openSocket(id, label) {
  if (socket) socket.close();
  sessionId = id;
  $("#turns").replaceChildren();
  $("#memory-panels").replaceChildren();
  $("#flush-events").replaceChildren();
  $("#session-title").textContent = `Session ${label}`;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/ws/v1/sessions/${id}/`, ["memfuse", `bearer.${apiKey}`]);
  socket.addEventListener("open", () => {
    $("#chat").hidden = false;
    status(`Connected to session ${label}.`);
  });
  socket.addEventListener("message", (event) => receive(JSON.parse(event.data)));
  socket.addEventListener("close", (event) => {
    if (event.code >= 4000) showError(`The session's socket was closed (code ${event.code}).`);
    status("Socket closed.");
  });
}

function receive(frame) {
  if (frame.type === "memory.results") showResults(frame);
  else if (frame.type === "messages.added") markStored(frame);
  else if (frame.type === "flush.completed") showFlush(frame);
  else if (frame.type === "error") showError(frame.error.message);
}

function sendTurn(event) {
  event.preventDefault();
  const text = $("#turn-text").value.trim();
  if (!text || !socket || socket.readyState !== WebSocket.OPEN) return;
  clearError();
  turnCount += 1;
  const turn = document.createElement("li");
  turn.id = `turn-${turnCount}`;
  turn.textContent = text;
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = "storing…";
  turn.append(meta);
  $("#turns").append(turn);

  const panel = document.createElement("div");
  panel.className = "panel";
  panel.id = `panel-${turnCount}`;
  const title = document.createElement("p");
  title.textContent = `Turn ${turnCount}: “${text}”`;
  panel.append(title);
  $("#memory-panels").prepend(panel);

  // Query first: the turn recalls what came before it, not itself.
  socket.send(JSON.stringify({ type: "memory.query", query: text, top_k: 5, request_id: `query-${turnCount}` }));
  socket.send(JSON.stringify({ type: "messages.add", messages: [{ role: "user", content: text }], request_id: `add-${turnCount}` }));
  $("#turn-text").value = "";
}

function markStored(frame) {
  const turn = $(`#turn-${String(frame.request_id).replace("add-", "")} .meta`);
  if (turn) turn.textContent = `stored, ${frame.pending_messages} message(s) waiting for a flush`;
}

function showResults(frame) {
  const panel = $(`#panel-${String(frame.request_id).replace("query-", "")}`);
  if (!panel) return;
  const stage = document.createElement("div");
  stage.className = "stage";
  stage.dataset.stage = frame.stage;
  const heading = document.createElement("h3");
  heading.textContent = frame.final ? "final (BM25 + vector, fused)" : "partial (BM25 first)";
  stage.append(heading);
  if (!frame.results.length) {
    const none = document.createElement("p");
    none.className = "empty";
    none.textContent = "nothing recalled";
    stage.append(none);
  } else {
    const list = document.createElement("ol");
    for (const result of frame.results) {
      const item = document.createElement("li");
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = `${result.score.toFixed(4)} `;
      const retrievers = document.createElement("span");
      retrievers.className = "retrievers";
      retrievers.textContent = ` [${Object.keys(result.metadata.retrievers || {}).join(", ")}]`;
      item.append(score, document.createTextNode(result.content), retrievers);
      list.append(item);
    }
    stage.append(list);
  }
  panel.append(stage);
}

function showFlush(frame) {
  const item = document.createElement("li");
  item.className = "flush";
  const time = new Date().toLocaleTimeString();
  item.textContent = `${time} flush.completed: ${frame.message_ids.length} message(s) embedded and indexed`;
  $("#flush-events").append(item);
}

async function flushNow() {
  clearError();
  try {
    await api("POST", `sessions/${sessionId}/flush`, {});
  } catch (error) {
    showError(error.message);
  }
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  if (socket) socket.close();
  apiKey = null;
  $("#api-key").value = "";
  $("#pickers").hidden = true;
  $("#chat").hidden = true;
  status("Key forgotten.");
}

$("#key-form").addEventListener("submit", connect);
$("#forget-key").addEventListener("click", forgetKey);
$("#user-form").addEventListener("submit", useUser);
$("#user-select").addEventListener("change", () => loadSessions($("#user-select").value).catch((e) => showError(e.message)));
$("#session-form").addEventListener("submit", openSession);
$("#turn-form").addEventListener("submit", sendTurn);
$("#flush").addEventListener("click", flushNow);

const stored = sessionStorage.getItem(KEY_STORAGE);
if (stored) {
  $("#api-key").value = stored;
  connect();
}
