// trustmesh console: what every page after login shares (an ES module, imported by each
// page's own script). Session, navigation, the JSON API with the CSRF header, live updates
// (Server-Sent Events), error display, and DOM helpers.
//
// Safety rule for all console scripts: data from the API goes into the page only as text
// (textContent, text nodes, setAttribute on data-/aria-/title attributes), never as markup:
// no innerHTML, no insertAdjacentHTML, no href or event attribute built from data. The CSP
// (script-src 'self'; style-src 'self') forbids inline script and style, so visual states are
// classes and attributes styled in app.css.

// --- DOM helpers ------------------------------------------------------------------------------

/**
 * el('td', {class: 'num', dataset: {seq: 3}, title: 'x'}, 'text', otherNode, null)
 * Children: strings and numbers become text nodes, null/undefined/false are skipped, arrays
 * are flattened. Props: class, dataset, on (event listeners), hidden, and any other attribute
 * set with setAttribute (never pass an on* attribute or an href made from data).
 */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'dataset') for (const [k, v] of Object.entries(value)) node.dataset[k] = String(v);
    else if (key === 'on') for (const [k, fn] of Object.entries(value)) node.addEventListener(k, fn);
    else if (key === 'hidden') node.hidden = Boolean(value);
    else if (key === 'text') node.textContent = String(value);
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    if (Array.isArray(child)) append(node, child);
    else if (child instanceof Node) node.appendChild(child);
    else node.appendChild(document.createTextNode(String(child)));
  }
}

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

/** Replace an element's children. */
export function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
  return node;
}

/** A value as text: null/undefined/'' as an em dash. */
export function text(value) {
  if (value === null || value === undefined || value === '') return '—';
  return String(value);
}

/** "not available": a null part of an answer that the operator's roles may not read. */
export function notAvailable() {
  return el('span', { class: 'value-na', title: 'not readable with your roles' }, 'n/a',
    el('span', { class: 'sr-only' }, ' (not readable with your roles)'));
}

/** A coloured word: the colour helps, the word says it (never colour alone). */
export function tag(word, cls = word) {
  return el('span', { class: `tag ${String(cls).replace(/[^a-z0-9-]/gi, '')}` }, text(word));
}

/**
 * A table in its scrolling box: columns [{label, cell(item) -> Node|string, num}], one row
 * per item; `row(item)` may give the row's props (dataset, class).
 */
export function dataTable({ id, caption, columns, items, row, empty = 'None.' }) {
  const head = el('tr', {}, columns.map((c) => el('th', { scope: 'col', class: c.num ? 'num' : null }, c.label)));
  const body = el('tbody');
  fillRows(body, items.map((item) => el('tr', row ? row(item) : {},
    columns.map((c) => el('td', { class: c.num ? 'num' : c.class }, c.cell(item))))), columns.length, empty);
  const table = el('table', { id }, caption ? el('caption', {}, caption) : null, el('thead', {}, head), body);
  return el('div', { class: 'table-wrap', role: 'region', tabindex: '0', 'aria-label': caption || 'table' }, table);
}

/** Table body rows, or one row saying there is nothing. */
export function fillRows(tbody, rows, columns, emptyText = 'Nothing to show.') {
  if (rows.length) fill(tbody, rows);
  else fill(tbody, el('tr', {}, el('td', { class: 'empty', colspan: columns }, emptyText)));
}

// --- formatting -------------------------------------------------------------------------------

/** "3 min ago" / "in 2 days", from an ISO 8601 time, against this browser's clock. */
export function relative(iso, now = Date.now()) {
  const t = Date.parse(iso);
  if (Number.isNaN(t)) return '';
  const seconds = Math.round((t - now) / 1000);
  const abs = Math.abs(seconds);
  // [seconds, singular, plural]
  const units = [[86400 * 365, 'year', 'years'], [86400, 'day', 'days'], [3600, 'h', 'h'], [60, 'min', 'min'], [1, 's', 's']];
  if (abs < 5) return 'just now';
  for (const [size, one, many] of units) {
    if (abs >= size) {
      const n = Math.floor(abs / size);
      const unit = n === 1 ? one : many;
      return seconds < 0 ? `${n} ${unit} ago` : `in ${n} ${unit}`;
    }
  }
  return '';
}

/** An ISO 8601 UTC time exactly as the API gave it, with a relative hint beside it. */
export function when(iso) {
  if (!iso) return el('span', { class: 'muted' }, 'never');
  return el('span', { class: 'when' }, el('time', { datetime: iso }, iso),
    el('span', { class: 'ago', 'data-ago': iso }, `(${relative(iso)})`));
}

// Keep the "3 min ago" hints current.
setInterval(() => {
  for (const span of $$('span.ago[data-ago]')) span.textContent = `(${relative(span.dataset.ago)})`;
}, 30000);

export function number(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(Number(n))) return '—';
  return Number(n).toLocaleString('en-US', { maximumFractionDigits: digits });
}

/** 1536 -> "1,536 B (1.5 KiB)": the exact count, and a readable size. */
export function bytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = Number(n);
  let unit = '';
  for (const u of units) {
    if (v < 1024) break;
    v /= 1024;
    unit = u;
  }
  return unit ? `${number(n)} B (${v.toFixed(1)} ${unit})` : `${number(n)} B`;
}

/** Seconds as "1h 30m" (TTLs, grant durations). */
export function duration(seconds) {
  if (seconds === null || seconds === undefined || seconds === '') return '—';
  let s = Number(seconds);
  if (!s) return '0s';
  const parts = [];
  for (const [size, name] of [[86400, 'd'], [3600, 'h'], [60, 'm'], [1, 's']]) {
    if (s >= size) {
      parts.push(`${Math.floor(s / size)}${name}`);
      s %= size;
    }
  }
  return parts.slice(0, 2).join(' ');
}

// --- the JSON API -----------------------------------------------------------------------------

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
    this.redirecting = false;
  }
}

const STATUS_WORDS = {
  400: 'Invalid request', 401: 'Not logged in', 403: 'Not permitted', 404: 'Not found', 409: 'Conflict',
  413: 'Too large', 429: 'Too many requests', 500: 'Console error', 502: 'Server unreachable',
  503: 'Unavailable',
};

let session = null;

function goToLogin() {
  window.location.assign('/login');
}

async function request(method, path, params, body) {
  let url = path;
  if (params) {
    const query = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') query.set(k, v);
    const q = query.toString();
    if (q) url += `?${q}`;
  }
  const headers = { Accept: 'application/json' };
  const init = { method, headers, credentials: 'same-origin', cache: 'no-store' };
  if (method === 'POST') {
    headers['Content-Type'] = 'application/json';
    headers['X-CSRF-Token'] = session ? session.csrf : '';
    init.body = JSON.stringify(body || {});
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    throw new ApiError(0, 'network', `the console cannot be reached (${err.message})`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (response.status === 401) {
    const err = new ApiError(401, 'unauthenticated', 'your console session has ended: log in again');
    err.redirecting = true;
    goToLogin();
    throw err;
  }
  if (!response.ok) {
    throw new ApiError(response.status, (data && data.error) || 'http',
      (data && data.message) || `${response.status} ${response.statusText}`);
  }
  if (data === null) throw new ApiError(response.status, 'bad_response', 'the console sent no JSON');
  return data;
}

export const api = {
  get: (path, params) => request('GET', path, params),
  post: (path, body) => request('POST', path, null, body),
};

/** The session of /api/session (after boot()). */
export const currentSession = () => session;

/** Whether the operator holds any of `roles` (cosmetic: the server decides every call). */
export function hasRole(...roles) {
  return Boolean(session && session.roles && session.roles.some((r) => roles.includes(r)));
}

// --- messages ---------------------------------------------------------------------------------

/** An error as one line of text, saying what kind of refusal it was. */
export function describe(err) {
  if (err instanceof ApiError) {
    const word = STATUS_WORDS[err.status] || (err.status ? `Error ${err.status}` : 'Error');
    return `${word}: ${err.message}`;
  }
  return `Error: ${err && err.message ? err.message : String(err)}`;
}

// Message areas stay in the page (empty ones take no room, see .message:empty in app.css)
// rather than being hidden, so screen readers announce their live region when text arrives.

/** Show an error in `area` (default: the page's #page-error, role=alert). */
export function showError(err, area = $('#page-error')) {
  if (err && err.redirecting) return;
  console.error(err);
  if (!area) return;
  showMessage(area, describe(err), 'error');
}

/** Show a result (kind 'ok' or 'error') in a message element. */
export function showMessage(area, message, kind = 'ok') {
  area.classList.add('message');
  area.classList.remove('ok', 'error');
  area.classList.add(kind);
  area.textContent = message;
}

export function clearMessage(area = $('#page-error')) {
  if (area) area.textContent = '';
}

// --- chrome: navigation, who am I, logout -----------------------------------------------------

function markNav() {
  const here = window.location.pathname.replace(/\/+$/, '') || '/';
  for (const link of $$('#nav a')) {
    const target = new URL(link.href, window.location.href).pathname;
    if (target === here) link.setAttribute('aria-current', 'page');
    else link.removeAttribute('aria-current');
  }
}

function renderWhoami(s) {
  const box = $('#whoami');
  if (!box) return;
  const roles = s.roles && s.roles.length ? s.roles.join(', ') : 'no roles';
  fill(box, el('span', { class: 'sr-only' }, 'Logged in as '), el('span', { class: 'operator' }, s.operator),
    ' ', el('span', { class: 'roles' }, `(${roles})`));
  box.title = `${s.spiffe_id || ''}${s.expires_at ? `; session until ${s.expires_at}` : ''}`;
}

async function logout(event) {
  event.preventDefault();
  const button = event.currentTarget;
  button.disabled = true;
  try {
    // The server answers 303 to /login; fetch follows it, and we go there ourselves anyway.
    await fetch('/logout', {
      method: 'POST', credentials: 'same-origin', cache: 'no-store',
      headers: { 'X-CSRF-Token': session ? session.csrf : '' },
    });
  } catch (err) {
    console.error(err);
  }
  goToLogin();
}

// --- live updates (Server-Sent Events) --------------------------------------------------------

const overviewListeners = [];
let lastOverview = null;

/** Call fn(overview) with every overview the live stream sends (and the last one, if any). */
export function onOverview(fn) {
  overviewListeners.push(fn);
  if (lastOverview) fn(lastOverview);
}

function setLive(state, detail) {
  const box = $('#live-status');
  if (!box) return;
  const words = { connecting: 'Live updates: connecting…', connected: 'Live updates: connected',
    disconnected: 'Live updates: disconnected' };
  const label = detail ? `${words[state]} (${detail})` : words[state];
  if (box.dataset.state === state && box.textContent === label) return; // unchanged: not announced again
  box.dataset.state = state;
  box.textContent = label;
}

// Counts on the nav links: pending access requests and quarantines, from each overview.
function updateBadges(overview) {
  const badges = [['/access', overview.pending_access, 'pending'], ['/anomalies', overview.quarantined, 'quarantined']];
  for (const [href, count, word] of badges) {
    const link = $(`#nav a[href="${href}"]`);
    if (!link) continue;
    let badge = $('.badge-count', link);
    if (!count) {
      if (badge) badge.remove();
      continue;
    }
    if (!badge) {
      badge = el('span', { class: 'badge-count' });
      link.appendChild(badge);
    }
    fill(badge, String(count), el('span', { class: 'sr-only' }, ` ${word}`));
  }
}

let source = null;
let retryDelay = 3000;
let retryTimer = null;

// The server allows 2 streams per session and notices a closed one only at its next write
// (within 5 s), so moving quickly between pages can be refused (429) for a moment: a refused
// or broken stream is retried with backoff (3 s, doubling, at most 60 s).
function startLive() {
  if (typeof EventSource === 'undefined') {
    setLive('disconnected', 'not supported by this browser');
    return;
  }
  clearTimeout(retryTimer);
  setLive('connecting');
  source = new EventSource('/api/events');
  source.addEventListener('open', () => {
    retryDelay = 3000;
    setLive('connected');
  });
  source.addEventListener('overview', (event) => {
    setLive('connected');
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return;
    }
    lastOverview = data;
    updateBadges(data);
    for (const fn of overviewListeners) {
      try {
        fn(data);
      } catch (err) {
        console.error(err);
      }
    }
  });
  source.addEventListener('session', () => {
    // The session ended (expiry, logout in another tab).
    source.close();
    goToLogin();
  });
  // 'error' is both the server's named "event: error" (a MessageEvent with data) and a
  // broken or refused connection (a plain Event).
  source.addEventListener('error', (event) => {
    if (event instanceof MessageEvent && event.data) {
      let message = 'the server reported an error';
      try {
        message = JSON.parse(event.data).message || message;
      } catch { /* keep the generic text */ }
      setLive('connected', message);
      return;
    }
    if (source.readyState === EventSource.CONNECTING) {
      setLive('connecting');
      return;
    }
    source.close();
    setLive('disconnected', 'retrying');
    // A closed stream: a dead session (go to login) or a refusal (retry later).
    api.get('/api/session').then(() => {
      retryTimer = setTimeout(startLive, retryDelay);
      retryDelay = Math.min(retryDelay * 2, 60000);
    }, (err) => {
      if (!err.redirecting) {
        retryTimer = setTimeout(startLive, retryDelay);
        retryDelay = Math.min(retryDelay * 2, 60000);
      }
    });
  });
}

// Close the stream when leaving the page, so its slot is freed sooner.
window.addEventListener('pagehide', () => {
  if (source) source.close();
  clearTimeout(retryTimer);
});

// --- start ------------------------------------------------------------------------------------

/**
 * Every page after login starts here: nav, logout, /api/session (401 -> /login), whoami and
 * live updates. Resolves to the session.
 */
export async function boot({ live = true } = {}) {
  markNav();
  const button = $('#logout');
  if (button) button.addEventListener('click', logout);
  try {
    session = await api.get('/api/session');
  } catch (err) {
    showError(err);
    throw err;
  }
  renderWhoami(session);
  if (live) startLive();
  return session;
}

/** Run a page: boot, then main(session); errors shown in #page-error. */
export function run(main, options) {
  boot(options).then(main).catch((err) => showError(err));
}

/** Read and write the page's query string (filters survive a reload and can be linked). */
export function queryParam(name, fallback = '') {
  const value = new URLSearchParams(window.location.search).get(name);
  return value === null ? fallback : value;
}

export function setQuery(params) {
  const query = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== undefined && v !== null && v !== '') query.set(k, v);
  const q = query.toString();
  window.history.replaceState(null, '', q ? `${window.location.pathname}?${q}` : window.location.pathname);
}

/** Disable a button while an async action runs. */
export async function busy(button, action) {
  button.disabled = true;
  button.setAttribute('aria-busy', 'true');
  try {
    return await action();
  } finally {
    button.disabled = false;
    button.removeAttribute('aria-busy');
  }
}
