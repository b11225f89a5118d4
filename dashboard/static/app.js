// fixloop ops dashboard: the page over the JSON API under /ops/api (no build step).
// Every view is built with DOM calls and textContent (never innerHTML with data), and
// every state change sends the session's CSRF token in X-CSRF-Token.

const API = "/ops/api";
const state = { session: null, live: null, refreshTimer: null, chart: null, charts: [], view: null, healthRange: "24h" };

// -- small helpers ------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const $ = (id) => document.getElementById(id);

function when(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 3600) return `${Math.round(seconds / 60)} min`;
  if (seconds < 86400 * 2) return `${(seconds / 3600).toFixed(1)} h`;
  return `${(seconds / 86400).toFixed(1)} days`;
}

function pct(share) {
  return share === null || share === undefined ? "—" : `${Math.round(share * 100)}%`;
}

function toast(text, kind = "info") {
  const el = $("toast");
  el.textContent = text;
  el.className = `toast ${kind}`;
  el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 4000);
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// A refresh the page makes on its own (after a live case change) says so: it must not
// keep the session alive, only what a person does may.
const BACKGROUND = { "X-Ops-Background": "1" };

async function api(path, { method = "GET", body, background = false } = {}) {
  const headers = { Accept: "application/json", ...(background ? BACKGROUND : {}) };
  if (method !== "GET") {
    headers["Content-Type"] = "application/json";
    if (state.session) headers["X-CSRF-Token"] = state.session.csrf_token;
  }
  const resp = await fetch(API + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  let data = null;
  try { data = await resp.json(); } catch { data = null; }
  if (resp.status === 401) {
    showLogin();
    throw new ApiError(401, "log in first");
  }
  if (!resp.ok) throw new ApiError(resp.status, (data && data.error) || resp.statusText);
  return data;
}

function can(role) {
  const rank = { viewer: 0, agent: 1, admin: 2 };
  return state.session && rank[state.session.role] >= rank[role];
}

function stateBadge(s) {
  return h("span", { class: `badge st-${s}` }, s.replaceAll("_", " "));
}

function levelBadge(level) {
  return h("span", { class: `badge lv-${level}` }, level);
}

function table(headers, rows, attrs = {}) {
  return h("table", attrs,
    h("thead", {}, h("tr", {}, headers.map((t) => h("th", {}, t)))),
    h("tbody", {}, rows));
}

// -- login ---------------------------------------------------------------------------------

function showLogin() {
  state.session = null;
  stopLive();
  $("top").hidden = true;
  $("view").hidden = true;
  $("login-view").hidden = false;
  $("username").focus();
}

async function onLogin(event) {
  event.preventDefault();
  $("login-error").textContent = "";
  const resp = await fetch("/ops/login", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify({ username: $("username").value, password: $("password").value }),
    credentials: "same-origin",
  });
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    $("login-error").textContent = data.error || "login failed";
    return;
  }
  $("password").value = "";
  startSession(data);
}

async function onLogout() {
  stopLive();
  await fetch("/ops/logout", {
    method: "POST", credentials: "same-origin",
    headers: state.session ? { "X-CSRF-Token": state.session.csrf_token } : {},
  }).catch(() => null);
  showLogin();
}

function startSession(session) {
  state.session = session;
  $("login-view").hidden = true;
  $("top").hidden = false;
  $("view").hidden = false;
  $("who").textContent = `${session.name} · ${session.role}`;
  startLive();
  route();
}

// -- live updates ------------------------------------------------------------------------------

function startLive() {
  stopLive();
  const source = new EventSource(`${API}/events`);
  state.live = source;
  source.addEventListener("hello", () => { $("live").textContent = "● live"; $("live").className = "live on"; });
  source.addEventListener("case", (event) => {
    const c = JSON.parse(event.data);
    $("live").textContent = `● ${c.device_id}: ${c.state.replaceAll("_", " ")}`;
    scheduleRefresh();
  });
  source.addEventListener("dropped", () => scheduleRefresh());
  source.addEventListener("logout", () => showLogin());
  source.onerror = () => { $("live").textContent = "○ reconnecting"; $("live").className = "live"; };
}

function stopLive() {
  if (state.live) state.live.close();
  state.live = null;
}

function typing() {
  // a live refresh must not wipe what a person is writing
  const active = document.activeElement;
  if (active && ["TEXTAREA", "INPUT", "SELECT"].includes(active.tagName) && $("view").contains(active)) return true;
  return [...document.querySelectorAll("#view textarea")].some((t) => t.value.trim() !== "");
}

function scheduleRefresh() {
  if (!["fleet", "cases", "queue", "case"].includes(state.view)) return;
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(() => {
    if (typing()) scheduleRefresh();
    else route({ quiet: true, live: true });
  }, 1000);
}

// -- views ---------------------------------------------------------------------------------

function section(title, ...children) {
  return h("section", { class: "card" }, h("h2", {}, title), ...children);
}

function countRow(row, first) {
  return h("tr", {},
    first.map((v) => h("td", {}, v)),
    h("td", { class: "num" }, row.devices),
    h("td", { class: "num ok" }, row.healthy),
    h("td", { class: "num watch" }, row.watch),
    h("td", { class: "num bad" }, row.anomalous),
    h("td", { class: "num silent" }, row.silent),
    h("td", { class: "num muted" }, row.unknown),
    h("td", { class: "num" }, row.open));
}

const LEVELS = ["healthy", "watch", "anomalous", "silent", "unknown"];
const LEVEL_NAMES = { healthy: "healthy", watch: "watch", anomalous: "anomalous", silent: "silent", unknown: "no score" };
const COLORS = { healthy: "#2b8a3e", watch: "#e67700", anomalous: "#c92a2a", silent: "#5f3dc4", unknown: "#adb5bd" };
const FILLS = { healthy: "rgba(43,138,62,0.35)", watch: "rgba(230,119,0,0.4)", anomalous: "rgba(201,42,42,0.45)",
  silent: "rgba(95,61,196,0.3)", unknown: "rgba(173,181,189,0.35)" };

// -- charts (uPlot, vendored) -----------------------------------------------------------------
// Each chart is drawn from /ops/api/charts/<name>; the same table downloads as CSV from
// /ops/api/charts/<name>.csv. The box says how many series and points it drew (data-series,
// data-points), which the browser tests compare with the API's answer.

function destroyCharts() {
  for (const chart of state.charts) chart.destroy();
  state.charts = [];
}

function csvLink(name, query) {
  return h("a", { href: `${API}/charts/${name}.csv${query}`, class: "csv", download: "", dataset: { chart: name } }, "CSV");
}

function chartSection(title, name, query, box, ...extra) {
  return h("section", { class: "card" },
    h("h2", { class: "with-tools" }, title, h("span", { class: "tools" }, ...extra, csvLink(name, query))),
    box);
}

function chartWidth(box) {
  return Math.max(box.clientWidth || 0, 320);
}

function plot(box, opts, data, rows) {
  if (box.chart) {  // drawn again (more data): the old one goes
    box.chart.destroy();
    state.charts = state.charts.filter((c) => c !== box.chart);
  }
  box.replaceChildren();
  const chart = new uPlot({ width: chartWidth(box), ...opts }, data, box);
  box.chart = chart;
  state.charts.push(chart);
  box.dataset.series = String(opts.series.length - 1);
  box.dataset.points = String(rows);
  return chart;
}

function noChart(box, text) {
  box.replaceChildren(h("p", { class: "muted" }, text));
  box.dataset.series = "0";
  box.dataset.points = "0";
}

// Draw a chart once its box is in the document (it needs its width), from data fetched
// beside the view's own; a chart that fails says so in its box and leaves the view be.
function drawLater(box, loading, draw) {
  requestAnimationFrame(() => {
    loading.then((data) => {
      if (!box.isConnected) return;
      if (typeof uPlot === "undefined") { noChart(box, "Charts are not available."); return; }
      draw(box, data);
    }).catch((err) => { if (box.isConnected) noChart(box, `Could not load this chart: ${err.message}`); });
  });
}

function daySeconds(day) {
  return Date.parse(`${day}T00:00:00Z`) / 1000;
}

function drawHealth(box, data) {
  if (!data.available) { noChart(box, "No telemetry store configured."); return; }
  const xs = data.rows.map((r) => Date.parse(r[0]) / 1000);
  const raw = LEVELS.map((_, i) => data.rows.map((r) => r[i + 1]));
  // stacked: each level drawn on top of the ones before it; the legend shows its own count
  let sum = xs.map(() => 0);
  const stacked = raw.map((values) => (sum = sum.map((v, j) => v + values[j])));
  plot(box, {
    height: 240,
    scales: { x: { time: true }, y: { range: (u, min, max) => [0, Math.max(max, 1)] } },
    series: [{}, ...LEVELS.map((level, i) => ({
      label: LEVEL_NAMES[level], stroke: COLORS[level], fill: FILLS[level], width: 1, points: { show: false },
      value: (u, v, si, idx) => (idx === null || idx === undefined ? "—" : raw[i][idx]),
    }))],
    bands: LEVELS.slice(1).map((_, i) => ({ series: [i + 2, i + 1] })),
    axes: [{}, { label: "devices" }],
  }, [xs, ...stacked], data.rows.length);
  // steps still being counted behind the answer: say so, and draw again when asked anew
  box.dataset.pending = String(data.pending || 0);
  if (data.pending > 0) {
    box.append(h("p", { class: "muted small" }, `Counting ${data.pending} more five-minute steps from the scores…`));
    setTimeout(() => {
      if (!box.isConnected) return;
      api(`/charts/fleet-health${box.dataset.query}`, { background: true })
        .then((next) => { if (box.isConnected) drawHealth(box, next); })
        .catch(() => null);
    }, 2000);
  }
}

function drawCases(box, data) {
  const xs = data.rows.map((r) => daySeconds(r[0]));
  const bars = (align) => uPlot.paths.bars({ size: [0.4, 24], align });
  plot(box, {
    height: 220,
    scales: { x: { time: true }, hours: { range: (u, min, max) => [0, Math.max(max || 0, 1)] } },
    series: [{},
      { label: "opened", stroke: "#1971c2", fill: "rgba(25,113,194,0.55)", paths: bars(-1), points: { show: false } },
      { label: "resolved", stroke: "#2b8a3e", fill: "rgba(43,138,62,0.55)", paths: bars(1), points: { show: false } },
      { label: "median time to resolution (h)", stroke: "#e8590c", width: 2, scale: "hours", spanGaps: true,
        points: { show: true, size: 5 } }],
    axes: [{}, { label: "cases" }, { side: 1, scale: "hours", label: "hours", grid: { show: false } }],
  }, [xs, data.rows.map((r) => r[1]), data.rows.map((r) => r[2]), data.rows.map((r) => r[3])], data.rows.length);
}

function drawFixes(box, data) {
  const col = (name) => data.columns.indexOf(name);
  const xs = data.rows.map((r) => daySeconds(r[0]));
  const share = data.rows.map((r) => (r[col("fixed_remotely_share")] === null ? null : Math.round(r[col("fixed_remotely_share")] * 1000) / 10));
  const stars = data.rows.map((r) => r[col("mean_stars")]);
  plot(box, {
    height: 220,
    scales: { x: { time: true }, pct: { range: [0, 100] }, stars: { range: [1, 5] } },
    series: [{},
      { label: "fixed remotely (%)", stroke: "#1c7ed6", width: 2, scale: "pct", spanGaps: true, points: { show: true, size: 5 } },
      { label: "mean rating (★)", stroke: "#f08c00", width: 2, scale: "stars", spanGaps: true, points: { show: true, size: 5 } }],
    axes: [{}, { scale: "pct", label: "% of resolutions" }, { side: 1, scale: "stars", label: "stars", grid: { show: false } }],
  }, [xs, share, stars], data.rows.length);
}

function drawFailures(box, data) {
  if (data.rows.length === 0) { noChart(box, "No devices registered."); return; }
  const labels = data.rows.map((r) => `${r[1]} ${r[0] === "batch" ? "batch " : ""}${r[2]}`);
  const xs = data.rows.map((_, i) => i);
  const pct = (dimension) => data.rows.map((r) => (r[0] === dimension ? Math.round(r[5] * 1000) / 10 : null));
  const bars = uPlot.paths.bars({ size: [0.7, 48] });
  plot(box, {
    height: 260,
    padding: [null, 70, null, null],  // room for the last rotated label
    scales: { x: { time: false, range: [-0.5, xs.length - 0.5] }, y: { range: (u, min, max) => [0, Math.max(max || 0, 1)] } },
    series: [{ label: "group", value: (u, v) => (v === null || v === undefined ? "—" : labels[Math.round(v)] || "") },
      { label: "by firmware (% of devices with a case)", stroke: "#1971c2", fill: "rgba(25,113,194,0.6)", paths: bars, points: { show: false } },
      { label: "by batch (% of devices with a case)", stroke: "#7048e8", fill: "rgba(112,72,232,0.6)", paths: bars, points: { show: false } }],
    axes: [{ splits: () => xs, values: (u, splits) => splits.map((i) => labels[i] || ""), rotate: -30, size: 90, gap: 4 },
      { label: "% of devices" }],
  }, [xs, pct("firmware"), pct("batch")], data.rows.length);
}

async function viewFleet(background) {
  const range = state.healthRange;
  const healthData = api(`/charts/fleet-health?range=${range}`, { background });
  const failureData = api("/charts/failure-rates", { background });
  // a failed chart read must not turn into an unhandled rejection before it is drawn
  const productData = api("/products", { background });
  healthData.catch(() => null);
  failureData.catch(() => null);
  productData.catch(() => null);
  const data = await api("/fleet", { background });
  const products = await productData.catch(() => null);
  const total = data.devices || 1;
  const bar = h("div", { class: "healthbar", title: "devices by health" },
    LEVELS.map((level) => h("span", {
      class: `seg lv-${level}`, style: null, dataset: { share: data.health[level] / total },
    })));
  // widths set through the CSSOM (allowed by the page's content security policy)
  for (const seg of bar.children) seg.style.flexGrow = String(Number(seg.dataset.share));
  const heads = ["devices", "healthy", "watch", "anomalous", "silent", "no score", "open cases"];
  const healthBox = h("div", { class: "chart", id: "chart-fleet-health", dataset: { query: `?range=${range}` } });
  const failureBox = h("div", { class: "chart", id: "chart-failure-rates" });
  drawLater(healthBox, healthData, drawHealth);
  drawLater(failureBox, failureData, drawFailures);
  const silentAfter = duration(data.silent_after_s);
  return [
    h("div", { class: "tiles" },
      h("div", { class: "tile" }, h("b", { id: "fleet-devices" }, data.devices), "devices"),
      h("div", { class: "tile ok" }, h("b", {}, data.health.healthy), "healthy"),
      h("div", { class: "tile watch" }, h("b", {}, data.health.watch), "watch"),
      h("div", { class: "tile bad" }, h("b", {}, data.health.anomalous), "anomalous"),
      h("a", { class: "tile silent", href: "#/devices?state=silent", title: `not heard from for ${silentAfter}` },
        h("b", { id: "fleet-silent" }, data.health.silent), "silent"),
      h("div", { class: "tile" }, h("b", { id: "fleet-open" }, data.open_cases.total), "open cases")),
    bar,
    chartSection("Fleet health over time", "fleet-health", `?range=${range}`, healthBox,
      ...["24h", "7d", "30d"].map((r) => h("button", { type: "button", class: r === range ? "on small" : "quiet small",
        onclick: () => { state.healthRange = r; route({ quiet: true }); } }, r))),
    h("div", { class: "grid2" },
      section("Needs a look",
        data.worst.length === 0 ? h("p", { class: "muted" }, "No device above the healthy level.") :
        table(["device", "model", "firmware", "score", ""], data.worst.map((d) => h("tr", {},
          h("td", {}, h("a", { href: `#/device/${encodeURIComponent(d.device_id)}`, class: "device-link" }, d.device_id)),
          h("td", {}, d.model), h("td", {}, d.firmware || "—"),
          h("td", { class: "num" }, d.score.toFixed(2)), h("td", {}, levelBadge(d.level))))),
        h("form", { class: "inline", onsubmit: (e) => {
          e.preventDefault();
          const id = e.target.elements.device.value.trim();
          if (id) location.hash = `#/device/${encodeURIComponent(id)}`;
        } }, h("input", { name: "device", placeholder: "device id", "aria-label": "device id" }),
          h("button", { type: "submit" }, "Open device"))),
      section("Open cases by stage",
        table(["stage", "cases"], Object.entries(data.open_cases.by_state).map(([s, n]) =>
          h("tr", {}, h("td", {}, stateBadge(s)), h("td", { class: "num" }, n)))))),
    section("By product model",
      table(["model", ...heads], data.by_model.map((r) => countRow(r, [r.model])), { id: "by-model" })),
    products && products.models.length > 0 ? section("Not described by a product file",
      h("p", { class: "muted small" }, "scored generically (unusual behaviour) and counted by diagnostics since its start"),
      table(["model", "product file", "devices", "count", "metrics", "as of"], products.models.map((m) => h("tr", {},
        h("td", {}, m.model), h("td", {}, m.has_file ? "yes, metrics missing" : "none"),
        h("td", { class: "num" }, m.devices),
        h("td", { class: "num", title: m.has_file ? "values of metrics the file does not list" : "readings scored without a file" }, m.count),
        h("td", {}, m.metrics.join(", ")), h("td", {}, when(m.at)))), { id: "product-mismatch" })) : null,
    chartSection("Failure rate by firmware and production batch", "failure-rates", "", failureBox),
    h("div", { class: "grid2" },
      section("By firmware", table(["model", "firmware", ...heads],
        data.by_firmware.map((r) => countRow(r, [r.model, r.firmware])), { id: "by-firmware" })),
      section("By production batch", table(["model", "batch", ...heads],
        data.by_batch.map((r) => countRow(r, [r.model, r.batch]))))),
    h("p", { class: "muted small" }, `as of ${when(data.generated_at)}; silent: not heard from for ${silentAfter}; firmware as each device's newest boot event says`),
  ];
}

async function viewDevices(params) {
  const query = new URLSearchParams({ limit: "500" });
  for (const key of ["state", "model", "firmware", "batch", "q"]) if (params.get(key)) query.set(key, params.get(key));
  const data = await api(`/devices?${query}`);
  const chosen = params.get("state");
  return [
    h("h1", {}, "Devices", chosen ? h("small", {}, ` ${LEVEL_NAMES[chosen] || chosen}`) : null),
    h("div", { class: "toolbar", id: "device-filter" },
      h("a", { href: "#/devices", class: `button ${chosen ? "quiet" : ""}` }, "all"),
      LEVELS.map((level) => h("a", { href: `#/devices?state=${level}`, class: `button ${level === chosen ? "" : "quiet"}`,
        dataset: { state: level } }, LEVEL_NAMES[level]))),
    h("p", { class: "muted small" }, `${data.total} devices${data.total > data.devices.length ? `, the first ${data.devices.length} shown` : ""}`),
    h("section", { class: "card" }, table(["device", "model", "firmware", "batch", "state", "score", "last heard"], data.devices.map((d) => h("tr", {},
      h("td", {}, h("a", { href: `#/device/${encodeURIComponent(d.device_id)}` }, d.device_id)),
      h("td", {}, d.model), h("td", {}, d.firmware || "—"), h("td", {}, d.batch || "—"),
      h("td", {}, levelBadge(d.state)), h("td", { class: "num" }, d.score === null ? "—" : d.score.toFixed(2)),
      h("td", {}, when(d.last_heard_at)))), { id: "devices" })),
  ];
}

const RANGES = ["1h", "6h", "24h", "7d", "30d"];

async function viewDevice(deviceId, params) {
  const range = params.get("range") || "24h";
  const data = await api(`/devices/${encodeURIComponent(deviceId)}?range=${range}`);
  const metrics = data.telemetry ? Object.keys(data.telemetry.metrics) : [];
  const chosen = metrics.includes(params.get("metric")) ? params.get("metric") : metrics[0];
  const go = (r, m) => { location.hash = `#/device/${encodeURIComponent(deviceId)}?range=${r}${m ? `&metric=${m}` : ""}`; };
  const chartBox = h("div", { class: "chart", id: "device-chart" });
  const out = [
    h("h1", {}, deviceId, " ", levelBadge(data.device.state),
      h("small", { id: "device-facts" }, ` ${data.device.model} · firmware ${data.device.firmware || "?"}${data.device.firmware_from === "boot event" ? " (from its last boot)" : ""} · batch ${data.device.batch || "?"} · last heard ${when(data.device.last_heard_at)}`)),
    h("div", { class: "toolbar" },
      h("span", {}, "Range "),
      RANGES.map((r) => h("button", { type: "button", class: r === range ? "on" : "quiet", onclick: () => go(r, chosen) }, r)),
      metrics.length ? h("label", {}, " Metric ", h("select", { id: "metric", onchange: (e) => go(range, e.target.value) },
        metrics.map((m) => h("option", { value: m, selected: m === chosen }, m)))) : null,
      h("span", { class: "muted small" }, data.range.bucket_s ? ` one point per ${duration(data.range.bucket_s)}` : "")),
    section("Telemetry and anomaly score", chartBox,
      h("p", { class: "legend small" },
        h("span", { class: "mk diagnosis" }, "▮ diagnosis"), h("span", { class: "mk command" }, "▮ command"),
        h("span", { class: "mk case" }, "▮ case step"), h("span", { class: "mk event" }, "▮ device event"),
        h("span", { class: "mk failure" }, "▮ predicted failure"))),
    h("div", { class: "grid2" },
      section("Marks in this range", data.marks.length === 0 ? h("p", { class: "muted" }, "None.") :
        h("ul", { class: "marks" }, data.marks.map((m) => h("li", {},
          h("span", { class: `mk ${m.kind}` }, "▮ "), when(new Date(m.at_ms).toISOString()), " — ", m.label,
          m.case_id ? h("a", { href: `#/case/${m.case_id}` }, " (case)") : null)))),
      section("Cases of this device", data.cases.length === 0 ? h("p", { class: "muted" }, "None.") :
        table(["case", "fault", "stage", "opened"], data.cases.map((c) => h("tr", {},
          h("td", {}, h("a", { href: `#/case/${c.case_id}` }, c.case_id)), h("td", {}, c.fault),
          h("td", {}, stateBadge(c.state)), h("td", {}, when(c.opened_at))))))),
  ];
  // the chart needs its box in the document to size itself: draw on the next frame
  requestAnimationFrame(() => drawChart(chartBox, data, chosen));
  return out;
}

function drawChart(box, data, metric) {
  if (state.chart) { state.chart.destroy(); state.chart = null; }
  if (!data.telemetry || typeof uPlot === "undefined") {
    box.append(h("p", { class: "muted" }, "No telemetry store configured."));
    return;
  }
  const tel = data.telemetry;
  const sc = data.score;
  const a = [tel.times_ms.map((t) => t / 1000), metric ? tel.metrics[metric] : tel.times_ms.map(() => null)];
  const b = [sc.times_ms.map((t) => t / 1000), sc.score, sc.score_max];
  const joined = uPlot.join([a, b]);
  const start = Date.parse(data.range.start) / 1000;
  const end = Date.parse(data.range.end) / 1000;
  const colors = { diagnosis: "#d9480f", command: "#1c7ed6", case: "#7048e8", event: "#868e96", failure: "#c92a2a" };
  const marks = data.marks.filter((m) => m.at_ms / 1000 >= start && m.at_ms / 1000 <= end);
  const markPlugin = {
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx;
        ctx.save();
        ctx.lineWidth = 2 * devicePixelRatio;
        for (const m of marks) {
          const x = Math.round(u.valToPos(m.at_ms / 1000, "x", true));
          ctx.strokeStyle = colors[m.kind] || "#000";
          ctx.setLineDash(m.kind === "case" ? [4, 4] : []);
          ctx.beginPath();
          ctx.moveTo(x, u.bbox.top);
          ctx.lineTo(x, u.bbox.top + u.bbox.height);
          ctx.stroke();
        }
        ctx.restore();
      }],
    },
  };
  const width = Math.max(box.clientWidth || 0, 600);
  state.chart = new uPlot({
    width, height: 320,
    plugins: [markPlugin],
    scales: { x: { time: true, range: [start, end] }, score: { range: [0, 1] } },
    series: [
      {},
      { label: metric || "metric", stroke: "#1971c2", width: 1.5, spanGaps: false },
      { label: "score (mean)", stroke: "#e8590c", width: 1.5, scale: "score" },
      { label: "score (max)", stroke: "rgba(232,89,12,0.35)", width: 1, scale: "score" },
    ],
    axes: [{}, { label: metric || "" }, { side: 1, scale: "score", label: "anomaly score", grid: { show: false } }],
  }, joined, box);
}

const STAGE_ORDER = ["opened", "awaiting_consent", "remote_fix", "verifying", "appointment_proposed",
  "booked", "visited", "resolved", "escalated", "dismissed", "expired"];

async function viewCases(background) {
  const data = await api("/cases", { background });
  const stages = Object.fromEntries(data.stages.map((s) => [s.state, s]));
  return [
    h("h1", {}, "Cases"),
    h("div", { class: "board", id: "board" }, STAGE_ORDER.map((name) => {
      const stage = stages[name] || { count: 0, cases: [] };
      return h("div", { class: "column", dataset: { stage: name } },
        h("h3", {}, stateBadge(name), h("span", { class: "count" }, stage.count)),
        stage.cases.map((c) => h("a", { class: `case-card urg-${c.urgency}`, href: `#/case/${c.case_id}`, dataset: { caseId: c.case_id } },
          h("b", {}, c.fault.replaceAll("_", " ")),
          h("span", { class: "small" }, `${c.device_id} · ${c.model}`),
          c.evidence.length ? h("span", { class: "small muted" }, c.evidence[0]) : null,
          c.rating ? h("span", { class: "small" }, "★".repeat(c.rating)) : null,
          c.needs_person ? h("span", { class: "small bad" }, c.needs_person) : null)),
        stage.count > stage.cases.length ? h("p", { class: "small muted" }, `+${stage.count - stage.cases.length} more`) : null);
    })),
  ];
}

async function viewCase(caseId, background) {
  const data = await api(`/cases/${encodeURIComponent(caseId)}`, { background });
  const c = data.case;
  const openTasks = data.tasks.filter((t) => t.state !== "closed");
  return [
    h("h1", {}, c.fault.replaceAll("_", " "), " ", stateBadge(c.state)),
    h("p", {}, h("a", { href: `#/device/${encodeURIComponent(c.device_id)}` }, c.device_id), ` · ${c.model} · urgency ${c.urgency} · confidence ${c.confidence}`,
      data.owner ? h("span", { id: "owner-name" }, ` · owner ${data.owner.name}`) : null),
    h("div", { class: "grid2" },
      section("Evidence", h("ul", {}, c.evidence.map((e) => h("li", {}, e))),
        h("p", { class: "small" }, `remedies: ${c.remedies.join(", ") || "—"}; tried: ${c.tried.join(", ") || "—"}`),
        c.failure_at ? h("p", { class: "small" }, `predicted failure ${when(c.failure_at)}`) : null),
      section("Owner's verdict", data.rating ? h("div", { id: "rating" },
        h("p", { class: "stars" }, "★".repeat(data.rating.stars) + "☆".repeat(5 - data.rating.stars)),
        data.rating.comment ? h("blockquote", {}, data.rating.comment) : null,
        data.rating.nothing_wrong ? h("p", { class: "bad" }, "The owner says nothing was wrong.") : null,
        h("p", { class: "small muted" }, when(data.rating.at))) : h("p", { class: "muted" }, "Not rated yet."),
        openTasks.length ? h("p", {}, h("a", { href: "#/queue" }, `In the person-needed queue: ${openTasks[0].reason}`)) : null)),
    section("What the system did and why",
      h("ol", { class: "timeline", id: "audit" }, data.audit.map((e) => h("li", { class: `actor-${e.actor}` },
        h("span", { class: "small muted" }, when(e.at)), " ",
        h("b", {}, e.actor), " ",
        e.action === "transition" ? h("span", {}, e.from_state ? stateBadge(e.from_state) : "", " → ", stateBadge(e.to_state)) : h("code", {}, e.action),
        " ", e.reason,
        Object.keys(e.evidence).length ? h("details", {}, h("summary", { class: "small" }, "evidence"),
          h("pre", {}, JSON.stringify(e.evidence, null, 2))) : null)))),
    data.appointments.length ? section("Visits", table(["start", "state", "part", "note"], data.appointments.map((a) =>
      h("tr", {}, h("td", {}, when(a.start)), h("td", {}, a.state), h("td", {}, a.part || "—"), h("td", {}, a.note || ""))))) : null,
  ];
}

async function taskAction(taskId, action, body) {
  try {
    await api(`/tasks/${encodeURIComponent(taskId)}/${action}`, { method: "POST", body: body || {} });
    toast({ take: "Taken over.", message: "Message stored for the owner.", close: "Closed." }[action], "ok");
    route({ quiet: true });
  } catch (err) {
    toast(err.message, "error");
  }
}

async function viewQueue(background) {
  const data = await api("/queue", { background });
  const agent = can("agent");
  return [
    h("h1", {}, "Person needed"),
    data.tasks.length === 0 ? h("p", { class: "muted", id: "queue-empty" }, "Nobody is waiting for a person.") :
    h("div", { class: "queue", id: "queue" }, data.tasks.map((t) => {
      const message = h("textarea", { rows: 2, placeholder: "Write to the owner…", "aria-label": "message to the owner" });
      return h("article", { class: "task card", dataset: { taskId: t.task_id } },
        h("header", {}, h("b", {}, t.reason), " ", h("span", { class: `badge task-${t.state}` }, t.state === "taken" ? `taken by ${t.assignee}` : "open")),
        t.case ? h("p", {}, h("a", { href: `#/case/${t.case_id}` }, `${t.case.fault.replaceAll("_", " ")} on ${t.case.device_id}`), " ", stateBadge(t.case.state),
          t.case.rating ? ` ${"★".repeat(t.case.rating)}` : "") : null,
        h("p", { class: "small muted" }, `waiting since ${when(t.created_at)}`),
        agent ? h("div", { class: "actions" },
          h("button", { type: "button", class: "take", disabled: t.state === "taken" && t.assignee === state.session.username,
            onclick: () => taskAction(t.task_id, "take") }, "Take over"),
          message,
          h("button", { type: "button", class: "write", onclick: () => message.value.trim() && taskAction(t.task_id, "message", { body: message.value }) }, "Write to owner"),
          h("button", { type: "button", class: "close-resolved", onclick: () => taskAction(t.task_id, "close", { outcome: "resolved" }) }, "Close: resolved"),
          h("button", { type: "button", class: "close-dismissed quiet", onclick: () => taskAction(t.task_id, "close", { outcome: "dismissed" }) }, "Close: dismiss"))
          : h("p", { class: "small muted" }, "Agents can take this over."));
    })),
  ];
}

async function viewCalendar(params) {
  const week = params.get("week");
  const data = await api(`/appointments${week ? `?week=${week}` : ""}`);
  const byDay = Object.fromEntries(data.days.map((d) => [d, []]));
  for (const a of data.appointments) {
    const day = a.start ? a.start.slice(0, 10) : null;
    if (day && byDay[day]) byDay[day].push(a);
  }
  return [
    h("h1", {}, `Appointments, week of ${data.week_start}`),
    h("div", { class: "toolbar" },
      h("a", { href: `#/calendar?week=${data.previous}`, class: "button quiet" }, "← previous week"),
      h("a", { href: `#/calendar?week=${data.next}`, class: "button quiet" }, "next week →")),
    h("div", { class: "week", id: "week" }, data.days.map((day) => h("div", { class: "day" },
      h("h3", {}, new Date(`${day}T00:00:00Z`).toLocaleDateString(undefined, { weekday: "short", day: "numeric", month: "short", timeZone: "UTC" })),
      byDay[day].map((a) => h("a", { class: `visit st-${a.state}`, href: `#/case/${a.case_id}` },
        h("b", {}, new Date(a.start).toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" })),
        h("span", {}, a.technician || a.technician_id || "?"),
        h("span", { class: "small" }, `${a.device_id || ""} · ${a.part || a.fault || ""}`)))))),
  ];
}

function outcomeRows(groups) {
  return Object.entries(groups).map(([name, g]) => h("tr", {},
    h("td", {}, name), h("td", { class: "num" }, g.cases), h("td", { class: "num" }, g.resolved),
    h("td", { class: "num" }, pct(g.fixed_remotely_share)), h("td", { class: "num" }, duration(g.median_resolution_s)),
    h("td", { class: "num" }, g.ratings), h("td", { class: "num" }, g.mean_stars ?? "—"),
    h("td", { class: "num" }, `${g.false_alarms} (${pct(g.false_alarm_share)})`)));
}

async function viewOutcomes() {
  const casesData = api("/charts/cases?days=30");
  const fixesData = api("/charts/fixes?days=30");
  casesData.catch(() => null);
  fixesData.catch(() => null);
  const data = await api("/outcomes");
  const t = data.totals;
  const heads = ["", "cases", "resolved", "fixed remotely", "median time to fix", "ratings", "mean ★", "false alarms"];
  const days = 30;
  const casesBox = h("div", { class: "chart", id: "chart-cases" });
  const fixesBox = h("div", { class: "chart", id: "chart-fixes" });
  drawLater(casesBox, casesData, drawCases);
  drawLater(fixesBox, fixesData, drawFixes);
  return [
    h("h1", {}, "Outcomes"),
    h("div", { class: "tiles" },
      h("div", { class: "tile" }, h("b", { id: "fixed-remotely" }, pct(t.fixed_remotely_share)), "fixed remotely"),
      h("div", { class: "tile" }, h("b", {}, duration(t.median_resolution_s)), "median time to fix"),
      h("div", { class: "tile" }, h("b", {}, t.mean_stars ?? "—"), `mean ★ of ${t.ratings}`),
      h("div", { class: "tile bad" }, h("b", {}, t.false_alarms), "false alarms (owners)")),
    chartSection(`Cases opened and resolved per day (last ${days} days, UTC)`, "cases", `?days=${days}`, casesBox),
    chartSection(`Fixed remotely and rating per day (last ${days} days)`, "fixes", `?days=${days}`, fixesBox),
    h("div", { class: "grid2" },
      section("By product model", table(heads, outcomeRows(data.by_model))),
      section("By firmware", table(heads, outcomeRows(data.by_firmware)))),
    section("Newest comments", data.comments.length === 0 ? h("p", { class: "muted" }, "None.") :
      h("ul", { class: "comments" }, data.comments.map((c) => h("li", {},
        h("span", { class: "stars" }, "★".repeat(c.stars)), " ", h("q", {}, c.comment),
        h("span", { class: "small muted" }, ` ${c.model} ${c.firmware} · ${c.fault} · ${when(c.at)} `),
        h("a", { href: `#/case/${c.case_id}` }, "case"))))),
  ];
}

async function startCampaign(group, button) {
  const action = window.prompt(`Start a pre-emptive campaign for ${group.fault} on ${group.dimension} ${group.value}.\nRemote action:`, group.suggested_action || "firmware_update");
  if (!action) return;
  button.disabled = true;
  try {
    const answer = await api("/campaigns", { method: "POST", body: {
      fault: group.fault, dimension: group.dimension, value: group.value, action,
      model: group.models.length === 1 ? group.models[0] : null,
    } });
    toast(`Campaign started: ${answer.cases} cases for ${answer.devices} devices.`, "ok");
    $("campaign-result").textContent = `Campaign started: ${answer.cases} cases for ${answer.devices} devices.`;
  } catch (err) {
    toast(err.message, "error");
    button.disabled = false;
  }
}

function groupRow(g, admin) {
  const button = admin && g.flagged ? h("button", { type: "button", class: "campaign" }, "Start campaign") : null;
  if (button) button.addEventListener("click", () => startCampaign(g, button));
  return h("tr", { class: g.flagged ? "flagged" : "" },
    h("td", {}, g.fault.replaceAll("_", " ")), h("td", {}, g.dimension), h("td", {}, g.models.length === 1 && g.dimension !== "model" ? `${g.models[0]} ${g.value}` : g.value),
    h("td", { class: "num" }, `${g.affected} / ${g.devices}`), h("td", { class: "num" }, pct(g.rate)),
    h("td", { class: "num" }, pct(g.rest_rate)), h("td", { class: "num" }, g.ratio === null ? "∞" : `${g.ratio}×`),
    h("td", { class: "num" }, `${pct(g.share_of_cases)} of cases / ${pct(g.share_of_fleet)} of devices`),
    h("td", { class: "num" }, g.p_value < 1e-4 ? g.p_value.toExponential(1) : g.p_value.toFixed(4)),
    h("td", {}, button || (g.flagged ? h("span", { class: "small muted" }, "admins can start a campaign") : "")));
}

async function viewInsight() {
  const data = await api("/insight");
  const admin = can("admin");
  const heads = ["fault", "by", "group", "affected", "rate", "rest", "ratio", "share", "p", ""];
  return [
    h("h1", {}, "Fleet insight"),
    h("p", { class: "muted" }, "Failure modes that cluster on one firmware, product model or production batch: the group's rate of devices with the fault against its peers' (one-sided binomial test)."),
    h("p", { id: "campaign-result", class: "ok" }),
    section("Clusters", data.flagged.length === 0 ? h("p", { class: "muted" }, "No group stands out.") :
      table(heads, data.flagged.map((g) => groupRow(g, admin)), { id: "clusters" })),
    section("Other groups", table(heads, data.groups.slice(0, 40).map((g) => groupRow(g, admin)))),
  ];
}

// -- routing ---------------------------------------------------------------------------------

async function route({ quiet = false, live = false } = {}) {
  if (!state.session) return;
  if (live && !["fleet", "cases", "queue", "case"].includes(state.view)) return;
  const [path, query] = (location.hash.slice(1) || "/fleet").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  const name = parts[0] || "fleet";
  state.view = name;
  for (const link of document.querySelectorAll("#nav a")) {
    link.classList.toggle("active", link.dataset.view === name || (name === "case" && link.dataset.view === "cases") || (name === "device" && link.dataset.view === "devices"));
  }
  const view = $("view");
  if (!quiet) view.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  try {
    let content;
    if (name === "device" && parts[1]) content = await viewDevice(decodeURIComponent(parts[1]), params);
    else if (name === "case" && parts[1]) content = await viewCase(decodeURIComponent(parts[1]), live);
    else if (name === "cases") content = await viewCases(live);
    else if (name === "queue") content = await viewQueue(live);
    else if (name === "calendar") content = await viewCalendar(params);
    else if (name === "outcomes") content = await viewOutcomes();
    else if (name === "insight") content = await viewInsight();
    else if (name === "devices") content = await viewDevices(params);
    else content = await viewFleet(live);
    if (state.chart && name !== "device") { state.chart.destroy(); state.chart = null; }
    destroyCharts();
    view.replaceChildren(...[content].flat().filter(Boolean));
    view.dataset.view = name;
    updateQueueCount(live);
  } catch (err) {
    if (err.status !== 401) view.replaceChildren(h("p", { class: "error" }, `Could not load this view: ${err.message}`));
  }
}

async function updateQueueCount(background = false) {
  try {
    const data = await api("/queue", { background });
    $("queue-count").textContent = data.tasks.length ? String(data.tasks.length) : "";
  } catch { /* shown on the next view */ }
}

async function boot() {
  $("login-form").addEventListener("submit", onLogin);
  $("logout").addEventListener("click", onLogout);
  window.addEventListener("hashchange", () => route());
  const resp = await fetch(`${API}/session`, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (resp.ok) startSession(await resp.json());
  else showLogin();
}

boot();
