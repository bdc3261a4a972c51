// topicgate explorer: a topic tree kept live from the public HTTP API only: the wildcard
// listing (`GET /topics/%23`, paged by `next`), one event stream per section (`#` and `$SYS/#`,
// read with fetch so that it can carry an Authorization header), and POST/PUT/DELETE.
"use strict";

const ROW = 24; // px, as --row in explorer.css
const HISTORY = 40; // recent messages kept per topic
const PAGE = 1000; // listing page size
const NATURAL = new Intl.Collator(undefined, { numeric: true }); // sensor2 before sensor10

// ---- state ---------------------------------------------------------------------------------

class Node {
  constructor(name, full, parent) {
    this.name = name;
    this.full = full;
    this.parent = parent;
    this.depth = parent ? parent.depth + 1 : -1;
    this.kids = null; // Map name -> Node
    this.sorted = null; // children in name order, rebuilt when a child is added
    this.msg = null; // the last message seen, or null
    this.count = 0; // messages seen live
    this.topics = 0; // topics with a value at or under this node
    this.open = false;
    this.hist = [];
    this.touched = 0; // time of the last message, for the highlight
  }
  child(name) {
    if (!this.kids) this.kids = new Map();
    let n = this.kids.get(name);
    if (!n) {
      n = new Node(name, this.full === null ? name : this.full + "/" + name, this);
      this.kids.set(name, n);
      this.sorted = null;
      state.structure = true;
    }
    return n;
  }
  children() {
    if (!this.kids) return [];
    if (!this.sorted) this.sorted = [...this.kids.values()].sort((a, b) => NATURAL.compare(a.name, b.name));
    return this.sorted;
  }
}

const root = new Node("", null, null);
const state = {
  selected: null,
  queue: [], // envelopes received, applied once per frame
  structure: true, // the visible rows must be recomputed
  rows: [],
  frame: 0,
  rate: { n: 0, since: performance.now(), shown: 0 },
  messages: 0,
  filter: "",
  auth: sessionStorage.getItem("topicgate-auth") || "",
  loaded: false,
  detailDirty: true,
  lastTouch: 0,
  abort: null, // ends the streams of the previous start
};
const $ = (id) => document.getElementById(id);

// ---- HTTP ----------------------------------------------------------------------------------

// Each level of a topic or filter percent-encoded for the path (`#` -> %23, `+` stays a level).
function topicPath(topic) {
  return "/topics/" + topic.split("/").map(encodeURIComponent).join("/");
}

// fetch with this page's credentials. `credentials: "omit"` keeps the browser from answering
// a 401's Basic challenge with its own login prompt: the page asks, once, and sends the header.
function api(url, init) {
  return fetch(url, { ...init, credentials: "omit" });
}

function headers(extra) {
  const h = new Headers(extra || {});
  if (state.auth) h.set("Authorization", state.auth);
  return h;
}

// A refusal worth telling the user about; returns the error text.
async function refusal(res) {
  let text = res.status + " " + res.statusText;
  try {
    const body = await res.json();
    if (body && body.message) text = res.status + " " + body.error + ": " + body.message;
  } catch (_) { /* not JSON */ }
  if (res.status === 429 && !text.includes("retry after")) {
    text += " (retry after " + (res.headers.get("Retry-After") || "?") + " s)";
  }
  return text;
}

function banner(text) {
  const b = $("banner");
  b.textContent = text || "";
  b.hidden = !text;
}

function setStatus(s, text) {
  const el = $("status");
  el.dataset.state = s;
  el.textContent = text || s;
}

// Loads every retained message under `filter`, page by page, applying each page at once.
async function list(filter, signal, firstPage) {
  let cursor = null;
  for (;;) {
    let url = topicPath(filter) + "?limit=" + PAGE;
    if (cursor !== null) url += "&cursor=" + encodeURIComponent(cursor);
    const res = await api(url, { headers: headers({ Accept: "application/json" }), signal });
    if (res.status === 429) {
      // Rate limited: say so, wait as told, and ask for the same page again.
      banner("Listing " + filter + " was refused: " + (await refusal(res)) + "; retrying");
      await sleep(1000 * (Number(res.headers.get("Retry-After")) || 1));
      continue;
    }
    if (!res.ok) return refused(res, filter);
    banner("");
    const page = await res.json();
    for (const m of page.messages) apply(m, false);
    if (cursor === null && firstPage) {
      drain(performance.now());
      firstPage();
    }
    schedule();
    if (page.next === null || page.next === undefined) return true;
    cursor = page.next;
  }
}

async function refused(res, what) {
  const text = await refusal(res);
  if (res.status === 401) {
    setStatus("refused", "sign in needed");
    askLogin(text);
  } else if (what.startsWith("$")) {
    // $SYS may be closed to this principal by the ACL; the rest still works.
    console.info("$SYS not readable: " + text);
  } else {
    setStatus("refused", String(res.status));
    banner("Reading " + what + " was refused: " + text);
  }
  return false;
}

// Reads the event stream of `filter` with fetch (EventSource cannot send Authorization),
// reconnecting with Last-Event-ID.
async function stream(filter, signal) {
  let lastId = null;
  let backoff = 500;
  while (!signal.aborted) {
    const h = headers({ Accept: "text/event-stream" });
    if (lastId) h.set("Last-Event-ID", lastId);
    try {
      const res = await api(topicPath(filter), { headers: h, cache: "no-store", signal });
      if (!res.ok) {
        await refused(res, filter);
        if (res.status === 401 || (res.status === 403 && filter.startsWith("$"))) return;
        await sleep(res.status === 429 ? 1000 * (Number(res.headers.get("Retry-After")) || 1) : backoff);
        backoff = Math.min(backoff * 2, 10000);
        continue;
      }
      if (!filter.startsWith("$")) {
        setStatus("live");
        banner("");
      }
      backoff = 500;
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let end;
        while ((end = buf.search(/\r?\n\r?\n/)) >= 0) {
          const block = buf.slice(0, end);
          buf = buf.slice(end + (buf[end] === "\r" ? 4 : 2));
          const ev = parseEvent(block);
          if (ev.id) lastId = ev.id;
          if (ev.event === "message" && ev.data) apply(JSON.parse(ev.data), true);
          else if (ev.event === "lagged") console.info("stream " + filter + " lagged: " + ev.data);
          else if (ev.event === "reset") console.info("stream " + filter + " reset");
        }
        schedule();
      }
    } catch (e) {
      if (signal.aborted) return;
      console.info("stream " + filter + " interrupted: " + e);
    }
    if (signal.aborted) return;
    if (!filter.startsWith("$")) setStatus("connecting", "reconnecting");
    await sleep(backoff);
    backoff = Math.min(backoff * 2, 10000);
  }
}

function parseEvent(block) {
  const ev = { event: "message", data: "", id: null };
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (line === "" || line[0] === ":") continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? "" : line.slice(i + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "event") ev.event = value;
    else if (field === "data") data.push(value);
    else if (field === "id") ev.id = value;
  }
  ev.data = data.join("\n");
  return ev;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---- applying messages ---------------------------------------------------------------------

// Queues a message; `live` ones count as traffic unless they repeat the value already shown
// (the snapshot a stream starts with).
function apply(m, live) {
  state.queue.push([m, live]);
}

function drain(now) {
  const q = state.queue;
  state.queue = [];
  for (const [m, live] of q) {
    let node = root;
    for (const level of m.topic.split("/")) node = node.child(level);
    const repeat = node.msg && node.msg.updated_at === m.updated_at && node.msg.payload === m.payload;
    if (repeat) continue;
    const cleared = m.retain && m.payload === "";
    const had = node.msg !== null;
    node.msg = cleared ? null : m;
    if (had !== (node.msg !== null)) {
      for (let n = node; n; n = n.parent) n.topics += node.msg ? 1 : -1;
      state.structure = true;
    }
    // In a small tree, a topic that arrives live is opened up to, so it is seen at once.
    if (live && node.hist.length === 0 && root.topics < 200) {
      for (let n = node.parent; n && n !== root; n = n.parent) n.open = true;
      state.structure = true;
    }
    if (live) {
      state.messages++;
      state.rate.n++;
      node.touched = now;
      state.lastTouch = now;
      for (let n = node; n; n = n.parent) n.count++;
    }
    node.hist.push(m);
    if (node.hist.length > HISTORY) node.hist.shift();
    if (node === state.selected) state.detailDirty = true;
  }
}

// ---- the tree, virtualised -----------------------------------------------------------------

let scheduled = false;
function schedule() {
  if (!scheduled) {
    scheduled = true;
    requestAnimationFrame(frame);
  }
}

function frame(now) {
  scheduled = false;
  drain(now);
  if (state.structure) flatten();
  renderRows(now);
  if (state.detailDirty) renderDetail();
  const r = state.rate;
  if (now - r.since >= 1000) {
    r.shown = Math.round((r.n * 1000) / (now - r.since));
    r.n = 0;
    r.since = now;
  }
  $("stats").textContent = root.topics.toLocaleString() + (root.topics === 1 ? " topic · " : " topics · ") +
    r.shown.toLocaleString() + " msg/s";
  $("tree-empty").hidden = state.rows.length > 0 || window.topicgateExplorer.loadedMs === null;
  // Keep the highlights fading while anything is recent.
  if (state.queue.length || now - state.lastTouch < 1100) schedule();
}

// The rows in view order: the topics, then the `$` topics under their own heading.
function flatten() {
  state.structure = false;
  const rows = [];
  const f = state.filter;
  const walk = (node) => {
    for (const k of node.children()) {
      if (f) {
        if (!matches(k, f)) continue;
        rows.push(k);
        walk(k);
      } else {
        rows.push(k);
        if (k.open) walk(k);
      }
    }
  };
  const tops = root.children();
  const plain = tops.filter((n) => !n.name.startsWith("$"));
  const sys = tops.filter((n) => n.name.startsWith("$"));
  for (const n of plain) {
    if (f && !matches(n, f)) continue;
    rows.push(n);
    if (f || n.open) walk(n);
  }
  if (sys.length) {
    rows.push({ sep: "$SYS: broker statistics" });
    for (const n of sys) {
      if (f && !matches(n, f)) continue;
      rows.push(n);
      if (f || n.open) walk(n);
    }
  }
  state.rows = rows;
  $("tree-space").style.height = rows.length * ROW + "px";
}

// Whether `node` or a node under it has `f` in its topic; memoised per filter text.
function matches(node, f) {
  if (node.mf === f) return node.mm;
  let m = node.full.toLowerCase().includes(f);
  if (!m) for (const k of node.children()) if (matches(k, f)) { m = true; break; }
  node.mf = f;
  node.mm = m;
  return m;
}

const pool = [];
function rowElement(i) {
  while (pool.length <= i) {
    const el = document.createElement("div");
    el.className = "trow";
    el.setAttribute("role", "treeitem");
    for (const c of ["caret", "tname", "tval", "tmeta"]) {
      const s = document.createElement("span");
      s.className = c;
      el.appendChild(s);
    }
    el.addEventListener("click", () => clickRow(el.node));
    $("tree-space").appendChild(el);
    pool.push(el);
  }
  return pool[i];
}

function renderRows(now) {
  const tree = $("tree");
  const first = Math.max(0, Math.floor(tree.scrollTop / ROW) - 5);
  const last = Math.min(state.rows.length, Math.ceil((tree.scrollTop + tree.clientHeight) / ROW) + 5);
  let used = 0;
  for (let i = first; i < last; i++, used++) {
    const node = state.rows[i];
    const el = rowElement(used);
    el.hidden = false;
    el.node = node;
    el.style.top = i * ROW + "px";
    const [caret, name, val, meta] = el.children;
    if (node.sep) {
      el.className = "trow sep";
      caret.textContent = "";
      name.textContent = node.sep;
      val.textContent = "";
      meta.textContent = "";
      el.style.paddingLeft = "";
      continue;
    }
    el.className = "trow" + (node === state.selected ? " sel" : "") + (node.touched && now - node.touched < 1000 ? " flash" : "");
    el.style.paddingLeft = 6 + node.depth * 16 + "px";
    caret.textContent = node.kids ? (node.open || state.filter ? "▼" : "▶") : "";
    name.textContent = node.name === "" ? "(empty)" : node.name;
    if (node.msg) {
      val.className = "tval";
      val.textContent = "= " + preview(node.msg);
    } else {
      val.className = "tval gone";
      val.textContent = node.hist.length && !node.kids ? "cleared" : "";
    }
    const parts = [];
    if (node.kids) parts.push(node.topics.toLocaleString() + " topic" + (node.topics === 1 ? "" : "s"));
    if (node.count) parts.push(node.count.toLocaleString() + " msg");
    meta.textContent = parts.join(" · ");
  }
  for (let i = used; i < pool.length; i++) pool[i].hidden = true;
}

function clickRow(node) {
  if (!node || node.sep) return;
  if (node.kids && (state.selected === node || !node.msg)) node.open = !node.open;
  select(node);
  state.structure = true;
  schedule();
}

function select(node) {
  state.selected = node;
  state.detailDirty = true;
  const form = $("publish");
  form.topic.value = node.full;
  schedule();
}

// ---- values --------------------------------------------------------------------------------

function bytesOf(m) {
  if (m.payload_encoding === "base64") {
    const s = atob(m.payload);
    const b = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++) b[i] = s.charCodeAt(i);
    return b;
  }
  return new TextEncoder().encode(m.payload);
}

const NUMBER = /^\s*-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$/;

function preview(m) {
  if (m.payload_encoding === "base64") {
    const ct = m.content_type || "binary";
    return "<" + ct + ", " + bytesOf(m).length + " bytes>";
  }
  const p = m.payload.length > 120 ? m.payload.slice(0, 120) + "…" : m.payload;
  return p.replace(/\s+/g, " ");
}

function isJson(m) {
  const ct = (m.content_type || "").toLowerCase();
  if (ct.includes("json")) return true;
  const t = m.payload.trim();
  return !ct && (t.startsWith("{") || t.startsWith("["));
}

function hex(bytes) {
  const lines = [];
  const n = Math.min(bytes.length, 4096);
  for (let off = 0; off < n; off += 16) {
    const row = bytes.slice(off, Math.min(off + 16, n));
    const h = [...row].map((b) => b.toString(16).padStart(2, "0")).join(" ");
    const a = [...row].map((b) => (b >= 32 && b < 127 ? String.fromCharCode(b) : ".")).join("");
    lines.push(off.toString(16).padStart(6, "0") + "  " + h.padEnd(48) + " " + a);
  }
  if (bytes.length > n) lines.push("… " + (bytes.length - n) + " more bytes");
  return lines.join("\n");
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// The value view: JSON pretty-printed, numbers large with a sparkline, images shown, other
// binary as hex, text as is.
function valueView(node) {
  const m = node.msg;
  const box = el("div");
  if (!m) {
    box.appendChild(el("p", "muted", "No retained value" + (node.kids ? " on this level." : ".")));
    return box;
  }
  const ct = (m.content_type || "").toLowerCase();
  if (m.payload_encoding === "base64") {
    if (ct.startsWith("image/")) {
      const pre = el("div", "value");
      const img = el("img");
      img.alt = node.full;
      img.src = "data:" + ct + ";base64," + m.payload;
      pre.appendChild(img);
      box.appendChild(pre);
    } else {
      box.appendChild(el("pre", "value", hex(bytesOf(m))));
    }
  } else if (NUMBER.test(m.payload)) {
    box.appendChild(el("pre", "value number", m.payload.trim()));
    const values = node.hist.filter((h) => NUMBER.test(h.payload)).map((h) => Number(h.payload));
    if (values.length > 1) box.appendChild(sparkline(values));
  } else if (isJson(m)) {
    let text = m.payload;
    try { text = JSON.stringify(JSON.parse(m.payload), null, 2); } catch (_) { /* shown as is */ }
    box.appendChild(el("pre", "value", text));
  } else {
    box.appendChild(el("pre", "value", m.payload === "" ? "(empty)" : m.payload));
  }
  return box;
}

function sparkline(values) {
  const NS = "http://www.w3.org/2000/svg";
  const w = 300, h = 60, pad = 4;
  const min = Math.min(...values), max = Math.max(...values);
  const span = max - min || 1;
  const pts = values.map((v, i) => [
    pad + (i * (w - 2 * pad)) / (values.length - 1),
    h - pad - ((v - min) * (h - 2 * pad)) / span,
  ]);
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", "0 0 " + w + " " + h);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "spark");
  const area = document.createElementNS(NS, "polygon");
  area.setAttribute("class", "area");
  area.setAttribute("points", [[pts[0][0], h], ...pts, [pts[pts.length - 1][0], h]].map((p) => p.join(",")).join(" "));
  const line = document.createElementNS(NS, "polyline");
  line.setAttribute("points", pts.map((p) => p.join(",")).join(" "));
  line.setAttribute("vector-effect", "non-scaling-stroke");
  const title = document.createElementNS(NS, "title");
  title.textContent = "last " + values.length + " values: min " + min + ", max " + max;
  svg.append(title, area, line);
  return svg;
}

function metaTable(m) {
  const t = el("table");
  const add = (k, v, mono) => {
    const tr = el("tr");
    tr.append(el("th", "", k), el("td", mono ? "mono" : "", v));
    t.appendChild(tr);
  };
  add("Last change", new Date(m.updated_at).toLocaleString() + "  (" + m.updated_at + ")");
  add("QoS", String(m.qos));
  add("Retained", m.retain ? "yes" : "no");
  add("Content type", m.content_type || "(none)", true);
  add("Size", bytesOf(m).length + " bytes (" + m.payload_encoding + ")");
  const p = m.properties || {};
  for (const u of p.user_properties || []) add("mqtt-user-" + u.name, u.value, true);
  if (p.response_topic) add("Response topic", p.response_topic, true);
  if (p.correlation_data) add("Correlation data", p.correlation_data, true);
  if (p.message_expiry_interval != null) add("Expires in", p.message_expiry_interval + " s");
  return t;
}

function historyTable(node) {
  const wrap = el("div", "history");
  const t = el("table");
  for (const m of [...node.hist].reverse()) {
    const tr = el("tr");
    tr.append(el("td", "", new Date(m.updated_at).toLocaleTimeString()), el("td", "", preview(m)));
    t.appendChild(tr);
  }
  wrap.appendChild(t);
  return wrap;
}

// ---- the selected topic --------------------------------------------------------------------

function renderDetail() {
  state.detailDirty = false;
  const box = $("detail");
  const node = state.selected;
  if (!node) return;
  box.replaceChildren();
  const card = el("div", "card");
  card.appendChild(el("div", "topic-title", node.full));
  const sub = [];
  if (node.kids) sub.push(node.topics + " topics beneath");
  sub.push(node.count + " messages seen live");
  card.appendChild(el("p", "muted", sub.join(" · ")));
  card.appendChild(valueView(node));
  box.appendChild(card);

  if (node.msg) {
    const meta = el("div", "card");
    meta.appendChild(el("h2", "", "Metadata"));
    meta.appendChild(metaTable(node.msg));
    box.appendChild(meta);
  }

  const actions = el("div", "card");
  actions.appendChild(el("h2", "", "Commands"));
  const buttons = el("div", "buttons");
  const out = el("pre", "cmd");
  out.hidden = true;
  for (const [label, make] of [["curl", curlCommand], ["mosquitto_pub", mosquittoCommand], ["coap-client", coapCommand]]) {
    const b = el("button", "", "Copy as " + label);
    b.type = "button";
    b.addEventListener("click", () => copy(make(node), out));
    buttons.appendChild(b);
  }
  if (!node.full.startsWith("$")) {
    const clear = el("button", "danger", "Clear retained");
    clear.type = "button";
    clear.id = "clear";
    clear.addEventListener("click", () => clearRetained(node, out));
    buttons.appendChild(clear);
  }
  actions.append(buttons, out);
  box.appendChild(actions);

  if (node.hist.length) {
    const h = el("div", "card");
    h.appendChild(el("h2", "", "Recent messages"));
    h.appendChild(historyTable(node));
    box.appendChild(h);
  }
}

// ---- commands ------------------------------------------------------------------------------

const quote = (s) => "'" + String(s).replace(/'/g, "'\\''") + "'";
const CONTENT_FORMATS = {
  "text/plain;charset=utf-8": 0, "text/plain": 0, "application/link-format": 40, "application/xml": 41,
  "application/octet-stream": 42, "application/exi": 47, "application/json": 50, "application/cbor": 60,
  "application/senml+json": 110, "application/senml+cbor": 112,
};

function sample(node) {
  const m = node.msg;
  const text = m && m.payload_encoding === "utf8" ? m.payload : "";
  return { text, ct: m ? m.content_type : null, retain: !m || m.retain, qos: m ? m.qos : 1 };
}

function curlCommand(node) {
  const s = sample(node);
  const url = location.origin + topicPath(node.full);
  const lines = [];
  lines.push("curl " + quote(url) + "   # read the retained value");
  let pub = "curl -X " + (s.retain ? "PUT" : "POST") + " " + quote(url + (s.qos ? "?qos=" + s.qos : ""));
  if (s.ct) pub += " -H " + quote("Content-Type: " + s.ct);
  for (const u of (node.msg && node.msg.properties && node.msg.properties.user_properties) || []) {
    pub += " -H " + quote("mqtt-user-" + u.name + ": " + u.value);
  }
  pub += " --data-binary " + quote(s.text);
  lines.push(pub);
  return lines.join("\n");
}

function mosquittoCommand(node) {
  const s = sample(node);
  const host = location.hostname.replace(/^\[|\]$/g, "");
  let c = "mosquitto_pub -h " + quote(host) + " -p 1883 -t " + quote(node.full) + " -q " + s.qos;
  if (s.retain) c += " -r";
  if (s.ct || (node.msg && node.msg.properties.user_properties.length)) {
    c += " -V mqttv5";
    if (s.ct) c += " -D publish content-type " + quote(s.ct);
    for (const u of node.msg.properties.user_properties) c += " -D publish user-property " + quote(u.name) + " " + quote(u.value);
  }
  c += " -m " + quote(s.text);
  return c + "\nmosquitto_sub -h " + quote(host) + " -p 1883 -v -t " + quote(node.full);
}

function coapCommand(node) {
  const s = sample(node);
  const host = location.hostname.includes(":") && !location.hostname.startsWith("[") ? "[" + location.hostname + "]" : location.hostname;
  const url = "coap://" + host + ":5683" + topicPath(node.full);
  let c = "coap-client-notls -m put";
  const cf = s.ct ? CONTENT_FORMATS[s.ct.toLowerCase().replace(/\s+/g, "")] : undefined;
  if (cf !== undefined) c += " -t " + cf;
  c += " -e " + quote(s.text) + " " + quote(url);
  return "coap-client-notls -m get " + quote(url) + "\n" + c;
}

async function copy(text, out) {
  out.hidden = false;
  out.textContent = text;
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    // No clipboard (not a secure context): the command is shown to copy by hand.
  }
}

async function clearRetained(node, out) {
  const res = await api(topicPath(node.full), { method: "DELETE", headers: headers() });
  out.hidden = false;
  if (res.status === 204) {
    out.textContent = "Cleared the retained value of " + node.full;
  } else if (res.status === 404) {
    out.textContent = "Nothing retained on " + node.full;
  } else {
    out.textContent = "Refused: " + (await refusal(res));
    if (res.status === 401) askLogin(out.textContent);
  }
}

// ---- publishing ----------------------------------------------------------------------------

async function publish(ev) {
  ev.preventDefault();
  const f = ev.target;
  const result = $("publish-result");
  const topic = f.topic.value;
  const h = headers();
  const ct = f.content_type.value.trim();
  if (ct) h.set("Content-Type", ct);
  for (const line of f.props.value.split("\n")) {
    const i = line.indexOf("=");
    if (i > 0) {
      try {
        h.append("mqtt-user-" + line.slice(0, i).trim(), line.slice(i + 1).trim());
      } catch (e) {
        result.className = "result bad";
        result.textContent = "Bad user property " + line + ": " + e.message;
        return;
      }
    }
  }
  let url = topicPath(topic) + "?qos=" + f.qos.value;
  if (f.retain.checked) url += "&retain=true";
  result.className = "result";
  result.textContent = "publishing…";
  try {
    const res = await api(url, { method: "POST", headers: h, body: f.payload.value });
    if (res.ok) {
      result.className = "result ok";
      result.textContent = "Published to " + topic + (f.retain.checked ? " (retained)" : "");
    } else {
      result.className = "result bad";
      result.textContent = "Refused: " + (await refusal(res));
      if (res.status === 401) askLogin(result.textContent);
    }
  } catch (e) {
    result.className = "result bad";
    result.textContent = "Failed: " + e.message;
  }
}

// ---- credentials ---------------------------------------------------------------------------

let asking = false;
function askLogin(why) {
  const d = $("auth");
  if (asking || d.open) return;
  asking = true;
  $("auth-why").textContent = why || "The gateway asks for credentials.";
  d.showModal();
}

function loginClosed() {
  asking = false;
  const d = $("auth");
  if (d.returnValue !== "ok") return;
  const f = $("auth-form");
  if (f.token.value.trim()) {
    state.auth = "Bearer " + f.token.value.trim();
  } else if (f.user.value) {
    const bytes = new TextEncoder().encode(f.user.value + ":" + f.password.value);
    state.auth = "Basic " + btoa(String.fromCharCode(...bytes));
  } else {
    state.auth = "";
  }
  sessionStorage.setItem("topicgate-auth", state.auth);
  f.password.value = "";
  start();
}

// ---- start ---------------------------------------------------------------------------------

async function start() {
  if (state.abort) state.abort.abort();
  const abort = new AbortController();
  state.abort = abort;
  const signal = abort.signal;
  banner("");
  setStatus("connecting");
  const t0 = performance.now();
  try {
    await load(signal, t0);
  } catch (e) {
    if (!signal.aborted) {
      setStatus("down", "unreachable");
      banner("The gateway cannot be reached: " + e.message);
    }
  }
}

async function load(signal, t0) {
  // The tree shows from the first page on; the small top levels open, as a first look.
  const firstLook = () => {
    for (const n of root.children()) if (n.topics <= 20) n.open = true;
    state.structure = true;
    window.topicgateExplorer.shownMs = performance.now() - t0;
  };
  if (!(await list("#", signal, firstLook))) return;
  window.topicgateExplorer.loadedMs = performance.now() - t0;
  const host = location.hostname.replace(/^\[|\]$/g, "");
  $("tree-empty-cmd").textContent = "mosquitto_pub -h " + host + " -r -t hello/world -m 'Hello'";
  schedule();
  stream("#", signal);
  if (await list("$SYS/#", signal)) stream("$SYS/#", signal);
}

function init() {
  window.topicgateExplorer = { root, state, shownMs: null, loadedMs: null };
  $("tree").addEventListener("scroll", schedule, { passive: true });
  window.addEventListener("resize", schedule);
  $("filter").addEventListener("input", (e) => {
    state.filter = e.target.value.trim().toLowerCase();
    state.structure = true;
    schedule();
  });
  $("publish").addEventListener("submit", publish);
  $("login").addEventListener("click", () => askLogin("Credentials for this gateway (kept for this tab)."));
  $("auth").addEventListener("close", loginClosed);
  // Frames stop while nothing arrives; the message rate still has to fall to 0.
  setInterval(schedule, 1000);
  $("tree").addEventListener("keydown", (e) => {
    const i = state.rows.indexOf(state.selected);
    let next = null;
    if (e.key === "ArrowDown") next = state.rows[i + 1];
    else if (e.key === "ArrowUp") next = state.rows[i - 1];
    else if (e.key === "ArrowRight" && state.selected) state.selected.open = true;
    else if (e.key === "ArrowLeft" && state.selected) state.selected.open = false;
    else return;
    e.preventDefault();
    if (next && next.sep) next = state.rows[state.rows.indexOf(next) + (e.key === "ArrowDown" ? 1 : -1)];
    if (next) {
      select(next);
      const tree = $("tree");
      const top = state.rows.indexOf(next) * ROW;
      if (top < tree.scrollTop) tree.scrollTop = top;
      else if (top + ROW > tree.scrollTop + tree.clientHeight) tree.scrollTop = top + ROW - tree.clientHeight;
    }
    state.structure = true;
    schedule();
  });
  start();
}

init();
