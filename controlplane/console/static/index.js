// Overview: the headline figures, from /api/overview once and then from every live update
// (the SSE stream sends the same document every 5 s). A part the operator's roles cannot read
// is null and shows as "n/a".

import { $, api, fill, notAvailable, number, onOverview, relative, run, when } from './app.js';

const ROOT_WARNING_DAYS = 30;

function put(id, value, digits = 0) {
  const node = $(`#${id}`);
  if (!node) return;
  if (value === null || value === undefined) fill(node, notAvailable());
  else fill(node, number(value, digits));
}

function render(o) {
  const agents = o.agents;
  for (const key of ['connected', 'unreachable', 'banned', 'total']) put(`agents-${key}`, agents ? agents[key] : null);

  const ca = o.ca;
  const root = $('#root-expires');
  const warning = $('#root-warning');
  warning.textContent = '';
  if (!ca) {
    fill(root, notAvailable());
    fill($('#trust-domain'), notAvailable());
  } else {
    fill(root, ca.root_expires_at ? when(ca.root_expires_at) : 'no root');
    fill($('#trust-domain'), ca.trust_domain || '—');
    const left = ca.root_expires_at ? (Date.parse(ca.root_expires_at) - Date.now()) / 86400000 : null;
    if (left !== null && left < ROOT_WARNING_DAYS) {
      warning.textContent = left < 0 ? 'The root has expired: rotate the CA now.'
        : `Expires ${relative(ca.root_expires_at)}: plan the CA rotation.`;
    }
  }

  const policy = o.policy;
  const enforcement = $('#policy-enforcement');
  if (!policy) {
    fill($('#policy-revision'), notAvailable());
    fill(enforcement, '');
  } else {
    fill($('#policy-revision'), policy.revision === null ? 'none' : String(policy.revision));
    if (policy.agents_at_revision === null || policy.agents_at_revision === undefined) {
      fill(enforcement, 'How many agents enforce it: ', notAvailable());
    } else {
      const connected = agents ? agents.connected : null;
      fill(enforcement, connected === null
        ? `${number(policy.agents_at_revision)} connected agent(s) enforce it`
        : `${number(policy.agents_at_revision)} of ${number(connected)} connected agent(s) enforce it`);
    }
  }

  put('denials-per-minute', o.denials_per_minute, 2);
  put('anomalies-per-minute', o.anomalies_per_minute, 2);
  put('quarantined', o.quarantined);
  put('pending-access', o.pending_access);
  fill($('#generated-at'), o.generated_at ? when(o.generated_at) : '—');
}

run(async () => {
  onOverview(render);
  render(await api.get('/api/overview'));
});
