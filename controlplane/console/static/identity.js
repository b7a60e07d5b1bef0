// The details of one identity (GET /api/identity?id=...): its registration entries, the
// agents that run it, and whether it is quarantined. Shared by the graph and identities pages.

import { api, duration, el, fill, showError, tag, text, when } from './app.js';

function entryItem(e) {
  return el('li', {},
    el('code', {}, e.id), ' on ', e.node ? el('strong', {}, e.node) : el('code', {}, e.parent_id || '—'),
    '; selectors: ', e.selectors && e.selectors.length ? e.selectors.join(', ') : 'none',
    `; X.509 TTL ${duration(e.x509_ttl)}`, e.admin ? ' ' : null, e.admin ? tag('admin', 'warn') : null);
}

function agentItem(a) {
  return el('li', {}, el('strong', {}, text(a.node)), ' ', tag(a.state),
    ' SVID expires ', when(a.svid_expires_at),
    `; policy revision ${a.policy_revision === null || a.policy_revision === undefined ? '—' : a.policy_revision}`);
}

function quarantineText(q) {
  if (!q) return el('span', {}, 'not quarantined');
  return el('span', {}, tag('quarantined', 'bad'), ' since ', when(q.since), ` by ${text(q.by)}: ${text(q.reason)}`);
}

/** Render an /api/identity answer into `box`; `extra` is a list of [label, node] rows. */
export function renderIdentity(box, data, extra = []) {
  const entries = data.entries || [];
  const agents = data.agents || [];
  const aliases = data.aliases || [];
  fill(box,
    el('dl', {},
      el('dt', {}, 'SPIFFE ID'), el('dd', {}, el('code', {}, data.id)),
      extra.map(([label, value]) => [el('dt', {}, label), el('dd', {}, value)]),
      el('dt', {}, 'Quarantine'), el('dd', {}, quarantineText(data.quarantine))),
    el('h3', {}, `Registration entries (${entries.length})`),
    entries.length ? el('ul', { class: 'plain' }, entries.map(entryItem)) : el('p', { class: 'muted' }, 'none'),
    el('h3', {}, `Agents running it (${agents.length})`),
    agents.length ? el('ul', { class: 'plain' }, agents.map(agentItem)) : el('p', { class: 'muted' }, 'none known'),
    aliases.length ? el('h3', {}, 'Node aliases (parents matched by selectors)') : null,
    aliases.length ? el('ul', { class: 'plain' }, aliases.map((a) => el('li', {}, el('code', {}, a)))) : null);
}

let latest = 0;

/** Fetch and show one identity; a slower earlier answer never overwrites a later one. */
export async function showIdentity(box, spiffeId, extra = []) {
  const mine = ++latest;
  fill(box, el('p', { class: 'placeholder' }, `Loading ${spiffeId}…`));
  try {
    const data = await api.get('/api/identity', { id: spiffeId });
    if (mine === latest) renderIdentity(box, data, extra);
  } catch (err) {
    if (mine !== latest) return;
    fill(box, el('p', {}, el('code', {}, spiffeId)));
    const area = el('div', { class: 'message error', role: 'alert' });
    box.appendChild(area);
    showError(err, area);
  }
}
