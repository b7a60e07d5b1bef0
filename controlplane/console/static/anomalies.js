// Anomalies and quarantines: the quarantines in force, each with its explanation, and a
// release (reason + one-time code, in #release-dialog); below, the detectors' recent findings
// (detect.anomaly audit events) with their explanation. Release buttons are hidden unless
// the session holds security-officer or admin: cosmetic, the server decides.

import {
  $, api, clearMessage, describe, el, fill, fillRows, hasRole, number, run, showError, showMessage, tag, text, when,
} from './app.js';

let canRelease = false;
let current = null; // the quarantine the dialog is about

function score(value) {
  return value === null || value === undefined ? '—' : number(value, 2);
}

function evidence(q) {
  const items = q.evidence || [];
  if (!items.length) return el('span', { class: 'muted' }, 'none');
  return el('ul', { class: 'plain' }, items.map((e) => el('li', {}, typeof e === 'string' ? e : JSON.stringify(e))));
}

function renderQuarantines(quarantines) {
  const rows = quarantines.map((q) => el('tr', { dataset: { target: q.target } },
    el('td', { class: 'id' }, el('code', {}, q.target)),
    el('td', {}, text(q.kind)),
    el('td', {}, text(q.detector)),
    el('td', { class: 'num' }, score(q.score)),
    el('td', { class: 'wide' }, text(q.reason)),
    el('td', {}, evidence(q)),
    el('td', {}, text(q.node)),
    el('td', { class: 'nowrap' }, when(q.since)),
    el('td', {}, text(q.by)),
    el('td', {}, el('button', {
      type: 'button', class: 'small release', hidden: !canRelease, 'aria-label': `Release ${q.target}`,
      on: { click: () => openRelease(q) },
    }, 'Release'))));
  fillRows($('#quarantines tbody'), rows, 10, 'Nothing is quarantined.');
}

function renderAnomalies(anomalies) {
  const list = $('#anomalies');
  if (anomalies === null || anomalies === undefined) {
    fill(list, el('li', { class: 'muted' }, 'Your roles cannot read the audit log, where the anomalies are recorded.'));
    return;
  }
  if (!anomalies.length) {
    fill(list, el('li', { class: 'muted' }, 'No anomaly in the last 24 hours.'));
    return;
  }
  fill(list, anomalies.map((a) => el('li', { dataset: { seq: a.seq, identity: a.identity || '' } },
    el('div', { class: 'head' },
      when(a.time),
      el('code', {}, text(a.identity)),
      el('span', {}, `detector ${text(a.detector)}, score ${score(a.score)}`),
      a.action ? tag(a.action, a.action.startsWith('dry-run') ? 'unknown' : 'warn') : null,
      a.quarantined ? tag('quarantined', 'bad') : null,
      a.node ? el('span', { class: 'muted' }, `node ${a.node}`) : null),
    el('p', { class: 'explanation' }, a.explanation || 'No explanation recorded.'))));
}

async function load() {
  try {
    const data = await api.get('/api/anomalies');
    renderQuarantines(data.quarantines || []);
    renderAnomalies(data.anomalies);
    clearMessage();
  } catch (err) {
    showError(err);
  }
}

function openRelease(q) {
  current = q;
  const dialog = $('#release-dialog');
  $('form', dialog).reset();
  fill($('#release-subject'), el('code', {}, q.target), q.reason ? ` — quarantined: ${q.reason}` : '');
  dialog.showModal();
}

async function release(dialog) {
  const q = current;
  const message = $('#anomalies-message');
  const submit = $('#release-submit');
  submit.disabled = true;
  try {
    await api.post('/api/quarantines/release', {
      target: q.target, reason: $('#release-reason').value.trim(), otp: $('#release-otp').value.trim(),
    });
    showMessage(message, `Released ${q.target}.`, 'ok');
  } catch (err) {
    if (err.redirecting) return;
    showMessage(message, `${q.target} was not released. ${describe(err)}`, 'error');
  } finally {
    submit.disabled = false;
    dialog.close();
  }
  await load();
}

run(async () => {
  canRelease = hasRole('security-officer', 'admin');
  const dialog = $('#release-dialog');
  $('form', dialog).addEventListener('submit', (event) => {
    event.preventDefault(); // method="dialog" would close it before we post
    if (current) release(dialog);
  });
  $('button.cancel', dialog).addEventListener('click', () => dialog.close());
  $('#refresh').addEventListener('click', load);
  await load();
});
