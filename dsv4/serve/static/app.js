// The dsv4 chat page: streams from this server's POST /v1/chat/completions (SSE chat.completion.chunk events),
// shows reasoning in a collapsible block, runs the demo's two tools (get_weather, calculator) itself and sends
// their results back. No build step, no libraries, nothing fetched but this server's own routes.
"use strict";

const KEY_STORAGE = "dsv4-api-key";
const MAX_TOOL_ROUNDS = 4; // model turns per message: a tool call, its answer, and some slack

const $ = (id) => document.getElementById(id);
const ui = {
  log: $("log"), form: $("composer"), prompt: $("prompt"), send: $("send"), stop: $("stop"),
  newChat: $("new-chat"), mode: $("mode"), temperature: $("temperature"), maxTokens: $("max-tokens"),
  useTools: $("use-tools"), system: $("system-prompt"), keyField: $("api-key-field"), key: $("api-key"),
  notice: $("notice"), model: $("model-name"),
};

let config = null;      // /ui/demo-tools.json: tools, weather table, model names, whether a key is needed
let conversation = [];  // the conversation as API messages (without the system prompt)
let controller = null;  // the AbortController of the request in flight
let epoch = 0;          // bumped by New chat: a reply still winding down then belongs to no conversation

class AuthError extends Error {}

// ------------------------------------------------------------------ small helpers
function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showNotice(text) {
  ui.notice.textContent = text;
  ui.notice.hidden = !text;
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  document.body.dataset.state = busy ? "busy" : "idle";
}

function scrollDown() {
  ui.log.scrollTop = ui.log.scrollHeight;
}

// json.dumps of a flat object as Python writes it (", " and ": "): the demo model was trained on that text
function pyDumps(obj) {
  return "{" + Object.entries(obj).map(([k, v]) => JSON.stringify(k) + ": " + JSON.stringify(v)).join(", ") + "}";
}

// ------------------------------------------------------------------ the page's tools
// A safe arithmetic evaluator (numbers, + - * /, parentheses, unary minus): a recursive-descent parser, no eval.
function evaluate(expression) {
  const tokens = String(expression).match(/\d+(?:\.\d+)?|[-+*/()]|\S/g) || [];
  let pos = 0;
  const peek = () => tokens[pos];
  const fail = (why) => { throw new Error(why); };
  function primary() {
    const t = tokens[pos++];
    if (t === undefined) fail("unexpected end of the expression");
    if (t === "(") {
      const v = sum();
      if (tokens[pos++] !== ")") fail("missing )");
      return v;
    }
    if (t === "-") return -primary();
    if (t === "+") return primary();
    if (/^\d/.test(t)) return Number(t);
    return fail(`unexpected ${JSON.stringify(t)}`);
  }
  function product() {
    let v = primary();
    while (peek() === "*" || peek() === "/") {
      const op = tokens[pos++];
      const r = primary();
      if (op === "/" && r === 0) fail("division by zero");
      v = op === "*" ? v * r : v / r;
    }
    return v;
  }
  function sum() {
    let v = product();
    while (peek() === "+" || peek() === "-") {
      const op = tokens[pos++];
      const r = product();
      v = op === "+" ? v + r : v - r;
    }
    return v;
  }
  if (!tokens.length) fail("empty expression");
  const value = sum();
  if (pos !== tokens.length) fail(`unexpected ${JSON.stringify(tokens[pos])}`);
  // as dsv4.demo.corpus.calculate writes it: an integer, else at most 4 decimals
  return Number.isInteger(value) ? String(value) : value.toFixed(4).replace(/0+$/, "").replace(/\.$/, "");
}

function runTool(name, argumentsText) {
  let args;
  try {
    args = JSON.parse(argumentsText || "{}");
  } catch (err) {
    return "error: the arguments are not valid JSON";
  }
  if (name === "get_weather") {
    const city = String(args.city ?? "");
    const report = config.weather[city];
    return pyDumps(report || { error: `no weather data for ${city}` });
  }
  if (name === "calculator") {
    try {
      return evaluate(args.expression ?? "");
    } catch (err) {
      return `error: ${err.message}`;
    }
  }
  return `error: unknown tool ${name}`;
}

// ------------------------------------------------------------------ one model turn, streamed
function requestBody() {
  const messages = [];
  const system = ui.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  const body = {
    model: config.models[0], messages, stream: true, stream_options: { include_usage: true },
    max_tokens: Math.max(1, parseInt(ui.maxTokens.value, 10) || 1024),
  };
  if (ui.mode.value === "non-think") {
    body.thinking = { type: "disabled" };
    const t = parseFloat(ui.temperature.value);
    if (!Number.isNaN(t)) body.temperature = t;
  } else {
    body.reasoning_effort = ui.mode.value === "think-max" ? "max" : "high";
  }
  if (ui.useTools.checked) body.tools = config.tools;
  return body;
}

function replyView(turn) {
  const view = el("div", "reply");
  view.dataset.state = "streaming";
  view.append(el("div", "who", "Assistant"));
  const reasoning = el("details", "reasoning");
  reasoning.open = true;
  reasoning.hidden = true;
  reasoning.append(el("summary", "", "Reasoning"), el("div", "reasoning-text"));
  const calls = el("div", "tool-calls");
  const content = el("div", "content");
  const stats = el("div", "stats");
  view.append(reasoning, calls, content, stats);
  turn.append(view);
  return { view, reasoning, reasoningText: reasoning.querySelector(".reasoning-text"), calls, content, stats };
}

function toolCard(parent) {
  const card = el("div", "tool-card");
  const name = el("div", "tool-name");
  const args = el("pre", "tool-args");
  const result = el("pre", "tool-result");
  result.hidden = true;
  card.append(el("span", "tool-label", "Tool call"), name, args, result);
  parent.append(card);
  return { card, name, args, result };
}

function formatStats(usage, t0, tFirst, tEnd) {
  const stats = [];
  const add = (key, label, value) => stats.push([key, label, value]);
  if (usage) {
    const cached = usage.prompt_cache_hit_tokens ?? usage.prompt_tokens_details?.cached_tokens ?? 0;
    add("prompt", "prompt", usage.prompt_tokens);
    add("cached", "cached", cached);
    add("completion", "completion", usage.completion_tokens);
    const seconds = tFirst !== null ? (tEnd - tFirst) / 1000 : 0;
    add("tps", "tok/s", seconds > 0 ? (usage.completion_tokens / seconds).toFixed(1) : "–");
  }
  add("ttft", "first token", tFirst !== null ? `${Math.round(tFirst - t0)} ms` : "–");
  if (usage && typeof usage.cost === "number") {
    add("cost", "cost", "$" + (usage.cost < 0.01 ? usage.cost.toFixed(6) : usage.cost.toFixed(4)));
  }
  return stats;
}

function showStats(node, stats) {
  node.replaceChildren(...stats.map(([key, label, value]) => {
    const item = el("span", "stat");
    item.dataset.stat = key;
    item.append(el("span", "stat-label", label + " "), el("span", "stat-value", String(value)));
    return item;
  }));
}

async function errorMessage(res) {
  try {
    const body = await res.json();
    return body?.error?.message || JSON.stringify(body);
  } catch (err) {
    return res.statusText || "error";
  }
}

// Stream one model turn into a new reply view. Returns {message, finish, stopped}; throws AuthError on a 401.
async function streamTurn(turn) {
  const view = replyView(turn);
  const headers = { "Content-Type": "application/json" };
  const key = ui.key.value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  const t0 = performance.now();
  let tFirst = null;
  let usage = null;
  let finish = null;
  let reasoning = "";
  let content = "";
  const calls = []; // by index: {id, type, function: {name, arguments}} and its card
  const first = () => { if (tFirst === null) tFirst = performance.now(); };
  const own = new AbortController(); // this turn's: a late finally of an earlier turn must not clear it
  controller = own;
  let stopped = false;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers, body: JSON.stringify(requestBody()), signal: own.signal,
    });
    if (res.status === 401) throw new AuthError(await errorMessage(res));
    if (!res.ok) throw new Error(`${res.status}: ${await errorMessage(res)}`);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buffer += decoder.decode(chunk.value, { stream: true });
      const lines = buffer.split("\n");
      buffer = lines.pop();
      for (const raw of lines) {
        const line = raw.trim();
        if (!line.startsWith("data:")) continue; // blank lines, ": keep-alive" comments
        const data = line.slice(5).trim();
        if (data === "[DONE]") { done = true; break; }
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message || "the stream failed");
        if (event.usage) usage = event.usage;
        const choice = event.choices && event.choices[0];
        if (!choice) continue;
        const delta = choice.delta || {};
        if (delta.reasoning_content) {
          first();
          reasoning += delta.reasoning_content;
          view.reasoning.hidden = false;
          view.reasoningText.textContent = reasoning;
        }
        if (delta.content) {
          first();
          content += delta.content;
          view.content.textContent = content;
        }
        for (const tc of delta.tool_calls || []) {
          first();
          const i = tc.index ?? calls.length;
          if (!calls[i]) {
            calls[i] = { id: tc.id, type: "function", function: { name: "", arguments: "" }, view: toolCard(view.calls) };
          }
          const call = calls[i];
          if (tc.id) call.id = tc.id;
          if (tc.function?.name) call.function.name += tc.function.name;
          if (tc.function?.arguments) call.function.arguments += tc.function.arguments;
          call.view.card.dataset.tool = call.function.name;
          call.view.name.textContent = call.function.name;
          call.view.args.textContent = call.function.arguments;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
        scrollDown();
      }
    }
  } catch (err) {
    if (err.name === "AbortError") {
      stopped = true;
    } else if (err instanceof AuthError) {
      view.view.remove();
      throw err;
    } else {
      view.view.dataset.state = "error";
      view.view.append(el("div", "error", `Error: ${err.message}`));
      return { message: null, finish: "error", stopped: false };
    }
  } finally {
    if (controller === own) controller = null;
  }
  const tEnd = performance.now();
  showStats(view.stats, formatStats(usage, t0, tFirst, tEnd));
  if (stopped) view.view.append(el("div", "stopped", "Stopped."));
  view.view.dataset.state = stopped ? "stopped" : "done";
  const message = { role: "assistant", content };
  if (reasoning) message.reasoning_content = reasoning;
  const complete = calls.filter(Boolean);
  if (complete.length && !stopped) {
    message.tool_calls = complete.map(({ id, type, function: f }) => ({ id, type, function: f }));
  }
  return { message, finish, stopped, calls: stopped ? [] : complete };
}

// ------------------------------------------------------------------ a user message, to the final answer
async function sendMessage(text) {
  const mine = epoch;
  const start = conversation.length;
  const turn = el("li", "turn");
  const user = el("div", "user");
  user.append(el("div", "who", "You"), el("div", "content", text));
  turn.append(user);
  ui.log.append(turn);
  scrollDown();
  conversation.push({ role: "user", content: text });
  setBusy(true);
  showNotice("");
  try {
    for (let round = 0; round < MAX_TOOL_ROUNDS; round++) {
      const reply = await streamTurn(turn);
      if (mine !== epoch) return; // New chat was pressed meanwhile
      if (!reply.message) break; // an error, shown in the reply
      if (reply.message.content || reply.message.reasoning_content || reply.message.tool_calls) {
        conversation.push(reply.message);
      }
      if (reply.stopped || !reply.calls.length) break;
      for (const call of reply.calls) {
        const result = runTool(call.function.name, call.function.arguments);
        call.view.result.hidden = false;
        call.view.result.textContent = result;
        call.view.card.dataset.state = "done";
        conversation.push({ role: "tool", tool_call_id: call.id, content: result });
      }
    }
  } catch (err) {
    if (!(err instanceof AuthError)) throw err;
    if (mine !== epoch) return;
    conversation.length = start; // as if never sent: the text goes back to the box, to send again with a key
    turn.remove();
    ui.prompt.value = text;
    ui.keyField.hidden = false;
    const why = ui.key.value.trim() ? "The API key was refused" : "This server needs an API key";
    showNotice(`${why}: enter it in the API key field, then send again. (The server said: ${err.message})`);
    ui.key.focus();
  } finally {
    setBusy(false);
  }
}

// ------------------------------------------------------------------ wiring
function submit() {
  const text = ui.prompt.value.trim();
  if (!text || !config || controller) return;
  ui.prompt.value = "";
  sendMessage(text).catch((err) => showNotice(`Error: ${err.message}`));
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
});

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && controller) controller.abort();
});

ui.stop.addEventListener("click", () => {
  if (controller) controller.abort(); // closes the connection: the server aborts the generation
});

ui.newChat.addEventListener("click", () => {
  epoch += 1;
  if (controller) controller.abort();
  conversation = [];
  ui.log.replaceChildren();
  showNotice("");
  ui.prompt.focus();
});

ui.key.addEventListener("input", () => {
  const key = ui.key.value.trim();
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
});

ui.mode.addEventListener("change", () => {
  ui.temperature.disabled = ui.mode.value !== "non-think";
});

async function init() {
  setBusy(false);
  ui.send.disabled = true;
  ui.temperature.disabled = ui.mode.value !== "non-think";
  const stored = sessionStorage.getItem(KEY_STORAGE);
  if (stored) {
    ui.key.value = stored;
    ui.keyField.hidden = false;
  }
  try {
    const res = await fetch("/ui/demo-tools.json");
    if (!res.ok) throw new Error(`${res.status}`);
    config = await res.json();
  } catch (err) {
    showNotice(`Could not load the page's settings from the server (${err.message}).`);
    return;
  }
  ui.model.textContent = config.models[0];
  for (const mode of config.modes || []) {  // the modes this model was trained for (think-max: not the demo)
    if (![...ui.mode.options].some((o) => o.value === mode)) ui.mode.add(new Option(mode, mode));
  }
  ui.maxTokens.max = config.max_output_tokens;
  if (parseInt(ui.maxTokens.value, 10) > config.max_output_tokens) ui.maxTokens.value = config.max_output_tokens;
  if (config.auth) ui.keyField.hidden = false;
  ui.send.disabled = false;
  document.body.dataset.ready = "1";
  ui.prompt.focus();
}

init();
