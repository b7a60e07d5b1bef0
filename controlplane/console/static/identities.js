// Identities: every registration entry (GET /api/identities), filterable, with the details
// of one identity (/api/identity) on demand.

import { $, api, clearMessage, duration, el, fill, fillRows, queryParam, run, setQuery, showError, tag, text, when } from './app.js';
import { showIdentity } from './identity.js';

let entries = [];

function list(items) {
  if (!items || !items.length) return el('span', { class: 'muted' }, 'none');
  return el('ul', { class: 'plain' }, items.map((i) => el('li', {}, el('code', {}, i))));
}

function render() {
  const query = $('#identity-filter').value;
  setQuery({ q: query.trim() });
  const words = query.toLowerCase().split(/\s+/).filter(Boolean);
  const shown = entries.filter((e) => {
    const hay = [e.spiffe_id, e.node, e.parent_id, e.id, ...(e.selectors || []), ...(e.dns_names || [])]
      .filter(Boolean).join(' ').toLowerCase();
    return words.every((w) => hay.includes(w));
  });
  const rows = shown.map((e) => el('tr', { dataset: { spiffeId: e.spiffe_id, entryId: e.id } },
    el('td', { class: 'id' }, el('code', {}, e.spiffe_id)),
    el('td', { class: 'id' }, e.node ? el('strong', {}, e.node) : el('code', {}, text(e.parent_id))),
    el('td', {}, list(e.selectors)),
    el('td', { class: 'nowrap' }, duration(e.x509_ttl)),
    el('td', { class: 'nowrap' }, e.jwt_ttl ? duration(e.jwt_ttl) : '—'),
    el('td', {}, list(e.dns_names)),
    el('td', {}, list(e.federates_with)),
    el('td', {}, e.admin ? tag('admin', 'warn') : 'no'),
    el('td', {}, el('code', {}, text(e.id))),
    el('td', { class: 'nowrap' }, when(e.updated_at || e.created_at)),
    el('td', {}, el('button', {
      type: 'button', class: 'small show-identity', 'aria-label': `Details of ${e.spiffe_id}`,
      on: { click: () => showIdentity($('#identity-details'), e.spiffe_id) },
    }, 'Details'))));
  fillRows($('#identities tbody'), rows, 11, entries.length ? 'No entry matches the filter.' : 'No registration entries.');
  const ids = new Set(entries.map((e) => e.spiffe_id));
  fill($('#identities-summary'), `${shown.length} of ${entries.length} entries shown; ${ids.size} distinct SPIFFE IDs`);
}

async function load() {
  try {
    const data = await api.get('/api/identities');
    entries = data.entries || [];
    clearMessage();
    render();
  } catch (err) {
    showError(err);
  }
}

run(async () => {
  const id = queryParam('id'); // read before render() rewrites the query string
  $('#identity-filter').value = queryParam('q');
  $('#identity-filter').addEventListener('input', render);
  $('#refresh').addEventListener('click', load);
  await load();
  if (id) showIdentity($('#identity-details'), id);
});
