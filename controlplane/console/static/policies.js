// Allowlists: policy revisions, a unified diff between any two, and "what would this
// candidate do to the flows of the last N days" (POST /api/policies/simulate).

import {
  $, api, busy, clearMessage, dataTable, el, fill, fillRows, number, run, showError, showMessage, tag, text, when,
} from './app.js';

let revisions = []; // newest first
let head = null;
let diffRequest = 0; // the newest diff asked for; older answers are dropped
let candidateEdited = false; // once the operator types, the prefill never overwrites it

// --- revisions and diff -----------------------------------------------------------------------

function previousOf(revision) {
  const older = revisions.map((r) => r.revision).filter((n) => n < revision);
  return older.length ? Math.max(...older) : 0;
}

function renderRevisions() {
  const rows = revisions.map((r) => el('tr', { dataset: { revision: r.revision } },
    el('td', {}, el('strong', {}, String(r.revision)), r.revision === head ? ' ' : null,
      r.revision === head ? tag('in force', 'at-head') : null),
    el('td', {}, text(r.author)),
    el('td', {}, text(r.comment)),
    el('td', { class: 'nowrap' }, when(r.created_at)),
    el('td', {}, r.sha256 ? el('code', { title: r.sha256 }, `${r.sha256.slice(0, 12)}…`) : '—'),
    el('td', {}, el('button', {
      type: 'button', class: 'small show-changes', 'aria-label': `Changes made by revision ${r.revision}`,
      on: { click: () => showDiff(previousOf(r.revision), r.revision) },
    }, 'Changes'))));
  fillRows($('#revisions tbody'), rows, 6, 'No policy revision yet.');
  fill($('#policy-head'), head === null ? 'No revision is in force.' : `Revision ${head} is in force.`);

  const option = (n, label) => el('option', { value: n }, label || `revision ${n}`);
  fill($('#diff-from'), option(0, '0 (empty: before the first revision)'), revisions.map((r) => option(r.revision)));
  fill($('#diff-to'), revisions.map((r) => option(r.revision)));
  if (head !== null) {
    $('#diff-to').value = String(head);
    $('#diff-from').value = String(previousOf(head));
  }
}

function diffClass(line) {
  if (line.startsWith('+++') || line.startsWith('---')) return 'diff-meta';
  if (line.startsWith('@@')) return 'diff-hunk';
  if (line.startsWith('+')) return 'diff-add';
  if (line.startsWith('-')) return 'diff-del';
  return null;
}

async function showDiff(from, to) {
  const mine = ++diffRequest;
  $('#diff-from').value = String(from);
  $('#diff-to').value = String(to);
  const out = $('#diff-output');
  try {
    const data = await api.get('/api/policies/diff', { from, to });
    if (mine !== diffRequest) return;
    const lines = (data.diff || '').replace(/\n$/, '').split('\n').filter((l, i, all) => all.length > 1 || l);
    // One block element per line (no newline characters): the classes colour the whole line,
    // and the +/- markers stay in the text, so colour is not the only sign.
    fill(out, lines.map((line) => el('span', { class: `diff-line ${diffClass(line) || ''}`.trim() }, line || ' ')));
    const added = lines.filter((l) => diffClass(l) === 'diff-add').length;
    const removed = lines.filter((l) => diffClass(l) === 'diff-del').length;
    fill($('#diff-summary'), lines.length
      ? `Revision ${data.from} → ${data.to}: ${added} line(s) added, ${removed} removed.`
      : `Revision ${data.from} → ${data.to}: no differences.`);
    clearMessage();
  } catch (err) {
    if (mine !== diffRequest) return;
    fill(out);
    fill($('#diff-summary'));
    showError(err);
  }
}

// --- simulation -------------------------------------------------------------------------------

/** Put the revision in force into #candidate: on arrival only if the operator has not
 * started editing it; with force (the "Reload" button) always. */
async function loadCandidate(force = false) {
  if (head === null) return;
  try {
    const data = await api.get('/api/policies/revision', { revision: head });
    if (force || !candidateEdited) {
      $('#candidate').value = data.documents || '';
      candidateEdited = false;
    }
  } catch (err) {
    showError(err);
  }
}

const FLOW_COLUMNS = [
  { label: 'Source', cell: (f) => el('code', {}, text(f.source)), class: 'id' },
  { label: 'Destination', cell: (f) => el('code', {}, text(f.destination)), class: 'id' },
  { label: 'Port', cell: (f) => text(f.port), num: true },
  { label: 'Route', cell: (f) => text(f.route) },
  { label: 'Seen as', cell: (f) => (f.decision ? tag(f.decision) : '—') },
  { label: 'Connections', cell: (f) => number(f.connections), num: true },
  { label: 'Last seen', cell: (f) => when(f.last_seen), class: 'nowrap' },
];
const RULE = { label: 'Rule', cell: (f) => text(f.rule) };

function section(id, title, hint, columns, items, empty) {
  return el('section', { class: 'panel', 'aria-labelledby': `${id}-title` },
    el('h3', { id: `${id}-title` }, `${title} (${items.length})`),
    hint ? el('p', { class: 'hint' }, hint) : null,
    dataTable({ id, caption: title, columns, items, empty }));
}

function renderSimulation(r) {
  const out = $('#simulate-output');
  const problems = r.problems || [];
  if (problems.length) {
    const box = el('div', { class: 'message error', role: 'alert' },
      el('p', {}, 'The candidate does not load, so nothing was simulated:'),
      el('ul', {}, problems.map((p) => el('li', {}, typeof p === 'string' ? p : JSON.stringify(p)))));
    fill(out, box);
    return;
  }
  const wouldDeny = r.would_deny || [];
  const newly = r.newly_allowed || [];
  const unused = r.unused_rules || [];
  fill(out,
    el('p', { class: `message ${wouldDeny.length ? 'error' : 'ok'}` },
      `Judged ${number(r.judged)} flow record(s)${r.since ? ` since ${r.since}` : ''}: `
      + `${wouldDeny.length} would be denied, ${newly.length} newly allowed, ${unused.length} rule(s) unused.`),
    section('simulate-would-deny', 'Would be denied', 'Traffic seen in the window that the candidate would refuse.',
      [...FLOW_COLUMNS, RULE, { label: 'Reason', cell: (f) => text(f.reason) }], wouldDeny, 'Nothing seen would be denied.'),
    section('simulate-newly-allowed', 'Newly allowed', 'Traffic denied today that the candidate would allow.',
      [...FLOW_COLUMNS, RULE], newly, 'Nothing newly allowed.'),
    section('simulate-unused-rules', 'Unused rules', 'Rules of the candidate that no flow in the window used.',
      [{ label: 'Rule', cell: (u) => text(u.rule) }, { label: 'From', cell: (u) => text(u.from) }], unused, 'Every rule was used.'),
    r.unverified && r.unverified.length
      ? section('simulate-unverified', 'Unverified callers', 'Flows from callers without a SPIFFE ID: no allowlist can admit them.',
        FLOW_COLUMNS, r.unverified, '')
      : null,
    r.granted && r.granted.length
      ? section('simulate-granted', 'Admitted by access grants', 'Flows that temporary access grants admitted.',
        [...FLOW_COLUMNS, RULE], r.granted, '')
      : null);
}

async function simulate(event) {
  const documents = $('#candidate').value;
  const out = $('#simulate-output');
  if (!documents.trim()) {
    showMessage(out, 'Write or load a candidate allowlist first.', 'error');
    return;
  }
  await busy(event.currentTarget, async () => {
    fill(out, el('p', { class: 'muted' }, 'Simulating…'));
    try {
      renderSimulation(await api.post('/api/policies/simulate', { documents, since: $('#simulate-since').value }));
    } catch (err) {
      fill(out, el('div', { class: 'message error', role: 'alert' }));
      showError(err, out.firstChild);
    }
  });
}

// --- start ------------------------------------------------------------------------------------

run(async () => {
  $('#diff').addEventListener('click', () => showDiff($('#diff-from').value, $('#diff-to').value));
  $('#simulate').addEventListener('click', simulate);
  $('#candidate-reset').addEventListener('click', () => loadCandidate(true));
  for (const type of ['input', 'change']) $('#candidate').addEventListener(type, () => { candidateEdited = true; });
  const data = await api.get('/api/policies');
  revisions = data.revisions || [];
  head = data.head === undefined ? null : data.head;
  renderRevisions();
  // The latest change, shown at once (same values as the selects now hold), and the
  // candidate, side by side.
  await Promise.all([head === null ? null : showDiff(previousOf(head), head), loadCandidate()]);
});
