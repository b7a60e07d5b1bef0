// Agents, like `istioctl proxy-status`: one row per attested agent with its state, last
// contact, SVID expiry, and the policy revision it enforces against the revision in force
// (from /api/overview, which is null when the operator's roles cannot read policies).

import { $, api, el, fill, fillRows, queryParam, run, setQuery, showError, clearMessage, tag, text, when } from './app.js';

let agents = [];
let head = null;

function revisionCell(a) {
  if (a.policy_revision === null || a.policy_revision === undefined) {
    return el('span', { class: 'muted' }, a.state === 'connected' ? 'unknown' : 'not connected');
  }
  const rev = String(a.policy_revision);
  if (head === null || head === undefined) return rev;
  if (a.policy_revision === head) return el('span', {}, rev, ' ', tag('at head', 'at-head'));
  return el('span', {}, rev, ' ', tag(`behind head ${head}`, 'behind'));
}

function listenersCell(a) {
  const list = a.permissive_listeners || [];
  if (!list.length) return el('span', { class: 'muted' }, 'none');
  return el('span', {}, tag(`${list.length} permissive`, 'permissive'),
    el('ul', { class: 'plain' }, list.map((l) => el('li', {}, el('code', {}, typeof l === 'string' ? l : JSON.stringify(l))))));
}

function statusCell(a) {
  if (!a.status || a.status === 'active') return text(a.status);
  return el('span', {}, tag(a.status), a.status_reason ? ` ${a.status_reason}` : null);
}

function matches(a, words, state) {
  if (state && a.state !== state) return false;
  const hay = [a.node, a.spiffe_id, a.address].filter(Boolean).join(' ').toLowerCase();
  return words.every((w) => hay.includes(w));
}

function render() {
  const words = $('#agent-filter').value.toLowerCase().split(/\s+/).filter(Boolean);
  const state = $('#agent-state').value;
  setQuery({ q: $('#agent-filter').value.trim(), state });
  const shown = agents.filter((a) => matches(a, words, state));
  const rows = shown.map((a) => el('tr', { dataset: { agent: a.spiffe_id, state: a.state } },
    el('td', {}, el('strong', {}, text(a.node))),
    el('td', { class: 'id' }, el('code', {}, a.spiffe_id)),
    el('td', { class: 'nowrap' }, text(a.address)),
    el('td', {}, tag(a.state)),
    el('td', {}, statusCell(a)),
    el('td', { class: 'nowrap' }, when(a.last_seen)),
    el('td', { class: 'nowrap' }, when(a.svid_expires_at)),
    el('td', { class: 'nowrap' }, revisionCell(a)),
    el('td', {}, listenersCell(a)),
    el('td', {}, text(a.attestation_type))));
  fillRows($('#agents tbody'), rows, 10, agents.length ? 'No agent matches the filter.' : 'No agents have attested yet.');
  const count = (s) => agents.filter((a) => a.state === s).length;
  const behind = head === null ? 0 : agents.filter((a) => a.state === 'connected' && a.policy_revision !== head).length;
  fill($('#agents-summary'), `${shown.length} of ${agents.length} shown; ${count('connected')} connected, `
    + `${count('unreachable')} unreachable, ${count('banned')} banned`
    + (head === null ? '' : `; revision in force ${head}, ${behind} connected agent(s) not at it`));
}

async function load() {
  try {
    const [data, overview] = await Promise.all([
      api.get('/api/agents'),
      api.get('/api/overview').catch(() => null), // the head revision is a bonus, not a must
    ]);
    agents = (data.agents || []).slice().sort((a, b) => String(a.node).localeCompare(String(b.node)));
    head = overview && overview.policy ? overview.policy.revision : null;
    clearMessage();
    render();
  } catch (err) {
    showError(err);
  }
}

run(async () => {
  $('#agent-filter').value = queryParam('q');
  $('#agent-state').value = queryParam('state');
  $('#agent-filter').addEventListener('input', render);
  $('#agent-state').addEventListener('change', render);
  $('#refresh').addEventListener('click', load);
  await load();
});
