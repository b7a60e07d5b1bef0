// Access requests: temporary grants by state, with approve (asks the one-time code in
// #otp-dialog) and deny (asks a reason in #deny-dialog) on pending ones. The buttons are
// hidden unless the session holds security-officer or admin; that is cosmetic, the server
// decides (and its refusal shows in #access-message).

import {
  $, api, clearMessage, describe, duration, el, fill, fillRows, hasRole, number, queryParam, run, setQuery,
  showError, showMessage, tag, text, when,
} from './app.js';

const STATES = ['all', 'pending', 'active', 'expired', 'denied', 'revoked', 'review'];
let canDecide = false;
let current = null; // the request a dialog is about

function summary(r) {
  return `${r.requester || 'someone'}: ${r.source} → ${r.destination} port ${r.port} for ${duration(r.duration)}`;
}

function approvals(r) {
  const got = (r.approvals || []).length;
  const needed = r.required_approvals;
  const who = r.approver ? ` (${r.approver})` : '';
  if (needed) return `${got} of ${needed}${who}`;
  return r.approver ? r.approver : '—';
}

function actions(r) {
  if (r.state !== 'pending') return null;
  return el('span', { class: 'row-actions' },
    el('button', {
      type: 'button', class: 'small primary approve', hidden: !canDecide, 'aria-label': `Approve request ${r.id}`,
      on: { click: () => openDialog('#otp-dialog', '#otp-subject', r) },
    }, 'Approve'), ' ',
    el('button', {
      type: 'button', class: 'small danger deny', hidden: !canDecide, 'aria-label': `Deny request ${r.id}`,
      on: { click: () => openDialog('#deny-dialog', '#deny-subject', r) },
    }, 'Deny'));
}

async function load() {
  const state = $('#state-filter').value;
  setQuery({ state: state === 'all' ? '' : state });
  try {
    const data = await api.get('/api/access', { state });
    const requests = data.requests || [];
    const rows = requests.map((r) => el('tr', { dataset: { id: r.id, state: r.state } },
      el('td', {}, el('code', {}, r.id)),
      el('td', {}, tag(r.state), r.break_glass ? ' ' : null, r.break_glass ? tag('break-glass', 'warn') : null),
      el('td', {}, text(r.requester)),
      el('td', { class: 'id' }, el('code', {}, text(r.source))),
      el('td', { class: 'id' }, el('code', {}, text(r.destination))),
      el('td', { class: 'num' }, text(r.port)),
      el('td', { class: 'wide' }, text(r.reason), r.decision_reason ? el('div', { class: 'muted' }, `Decision: ${r.decision_reason}`) : null),
      el('td', { class: 'nowrap' }, duration(r.duration)),
      el('td', { class: 'nowrap' }, when(r.created_at)),
      el('td', { class: 'nowrap' }, r.expires_at ? when(r.expires_at) : '—'),
      el('td', {}, approvals(r)),
      el('td', { class: 'nowrap' }, actions(r))));
    fillRows($('#access tbody'), rows, 12, state === 'all' ? 'No access requests.' : `No ${state} access requests.`);
    const pending = requests.filter((r) => r.state === 'pending').length;
    fill($('#access-summary'), `${number(requests.length)} request(s) shown${pending ? `, ${pending} pending` : ''}`);
    clearMessage();
  } catch (err) {
    showError(err);
  }
}

function openDialog(dialogSel, subjectSel, request) {
  current = request;
  const dialog = $(dialogSel);
  $('form', dialog).reset();
  fill($(subjectSel), el('code', {}, request.id), ' ', summary(request), request.reason ? ` — “${request.reason}”` : '');
  dialog.showModal();
}

async function decide(dialog, verb, body) {
  const request = current;
  const message = $('#access-message');
  const submit = $('button[type="submit"]', dialog);
  submit.disabled = true;
  try {
    await api.post(`/api/access/${encodeURIComponent(request.id)}/${verb}`, body);
    showMessage(message, `Request ${request.id} ${verb === 'approve' ? 'approved' : 'denied'}: ${summary(request)}.`, 'ok');
  } catch (err) {
    if (err.redirecting) return;
    showMessage(message, `Request ${request.id} was not ${verb === 'approve' ? 'approved' : 'denied'}. ${describe(err)}`, 'error');
  } finally {
    submit.disabled = false;
    dialog.close();
  }
  await load();
}

function wireDialog(dialogSel, handler) {
  const dialog = $(dialogSel);
  const form = $('form', dialog);
  form.addEventListener('submit', (event) => {
    event.preventDefault(); // the form's method="dialog" would close it before we post
    if (current) handler(dialog);
  });
  $('button.cancel', dialog).addEventListener('click', () => dialog.close());
}

run(async () => {
  canDecide = hasRole('security-officer', 'admin');
  $('#access-roles-note').hidden = canDecide;
  const state = queryParam('state', 'all');
  $('#state-filter').value = STATES.includes(state) ? state : 'all';
  $('#state-filter').addEventListener('change', load);
  $('#refresh').addEventListener('click', load);
  wireDialog('#otp-dialog', (d) => decide(d, 'approve', { otp: $('#otp-input').value.trim() }));
  wireDialog('#deny-dialog', (d) => decide(d, 'deny', { reason: $('#deny-reason').value.trim() }));
  await load();
});
