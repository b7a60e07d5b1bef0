// Service graph: /api/graph drawn with cytoscape (vendor/, loaded before this module), and
// the same connections as a table, which is the accessible view (decisions in words).
// Refreshes when the window or team changes, on "Refresh now", and every 15 s.

import {
  $, api, bytes, clearMessage, el, fill, fillRows, number, queryParam, run, setQuery, showError, tag, text, when,
} from './app.js';
import { showIdentity } from './identity.js';

const REFRESH_MS = 15000;
const WINDOWS = ['15m', '1h', '24h', '7d'];
// Colour and line style per decision (never colour alone: the legend and table say the word).
const DECISIONS = {
  allow: { colour: '#1a7f37', line: 'solid', arrow: 'triangle' },
  deny: { colour: '#c21a27', line: 'dashed', arrow: 'tee' },
  audit: { colour: '#bf8700', line: 'double', arrow: 'triangle' },
  unverified: { colour: '#6e7781', line: 'dotted', arrow: 'triangle' },
};
const FONT = 'system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif';

let graph = { nodes: [], edges: [] }; // the last answer
let edgesByKey = new Map();
let nodesById = new Map();
let selectedEdge = null; // an edge key
let selectedNode = null; // a node id
let request = 0; // the newest load; older answers are dropped
const teamsSeen = new Set();
let cy = null;

const edgeKey = (e) => JSON.stringify([e.source, e.destination, e.port, e.decision, e.route, e.rule]);

/** A short label: a SPIFFE ID's path (the trust domain is the same everywhere), or the address. */
function shortName(id) {
  const m = /^spiffe:\/\/[^/]+(\/.*)$/.exec(id);
  return m ? m[1] : id;
}

// --- drawing ----------------------------------------------------------------------------------

function graphStyle() {
  const style = [
    {
      selector: 'node',
      style: {
        label: 'data(label)', 'font-size': 11, 'font-family': FONT, color: '#1b1f24',
        'text-valign': 'bottom', 'text-margin-y': 4, 'text-wrap': 'ellipsis', 'text-max-width': '180px',
        'text-background-color': '#ffffff', 'text-background-opacity': 0.85, 'text-background-padding': '2px',
        'background-color': '#0b5cad', shape: 'round-rectangle', width: 22, height: 22,
      },
    },
    { selector: 'node[kind = "address"]', style: { shape: 'diamond', 'background-color': '#6e7781' } },
    { selector: 'node:selected', style: { 'border-width': 4, 'border-color': '#f0a800' } },
    {
      selector: 'edge',
      style: { width: 2, 'curve-style': 'bezier', 'arrow-scale': 1.1, 'target-arrow-shape': 'triangle' },
    },
    { selector: 'edge:selected', style: { width: 5, 'overlay-color': '#f0a800', 'overlay-opacity': 0.3, 'overlay-padding': 4 } },
  ];
  for (const [decision, d] of Object.entries(DECISIONS)) {
    style.splice(style.length - 1, 0, {
      selector: `edge[decision = "${decision}"]`,
      style: {
        'line-color': d.colour, 'target-arrow-color': d.colour, 'line-style': d.line, 'target-arrow-shape': d.arrow,
        width: decision === 'audit' ? 4 : 2,
      },
    });
  }
  return style;
}

function startDrawing() {
  if (typeof window.cytoscape !== 'function') {
    fill($('#graph'), el('p', { class: 'graph-empty' }, 'The drawing is unavailable; the table below lists every connection.'));
    return;
  }
  cy = window.cytoscape({
    container: $('#graph'), elements: [], style: graphStyle(), minZoom: 0.2, maxZoom: 3,
    boxSelectionEnabled: false, selectionType: 'single',
  });
  cy.on('tap', 'edge', (event) => selectEdge(event.target.data('key')));
  cy.on('tap', 'node', (event) => selectNode(event.target.id()));
  window.consoleGraph = cy; // for browser tests and the curious: the cytoscape instance
}

function draw() {
  if (!cy) return;
  let added = 0;
  cy.batch(() => {
    cy.edges().remove();
    cy.nodes().filter((n) => !nodesById.has(n.id())).remove();
    for (const node of nodesById.values()) {
      const data = { id: node.id, kind: node.kind, team: node.team || '', label: shortName(node.id) };
      const existing = cy.getElementById(node.id);
      if (existing.nonempty()) {
        existing.data(data);
      } else {
        // New nodes start near the middle; the layout below places them.
        cy.add({ group: 'nodes', data, position: { x: Math.random() * 400, y: Math.random() * 300 } });
        added += 1;
      }
    }
    cy.add(graph.edges.map((e, i) => ({
      group: 'edges',
      data: { id: `edge-${i}`, source: e.source, target: e.destination, decision: e.decision, key: edgeKey(e) },
    })));
  });
  // Lay out only when nodes came: a periodic refresh leaves what the operator looks at in place.
  if (added) {
    // Mostly new nodes (first load, another team): a fresh layout; else start from where they are.
    const fresh = added > cy.nodes().length / 2;
    cy.layout({
      name: 'cose', animate: false, randomize: fresh, fit: true, padding: 30, nodeDimensionsIncludeLabels: true,
    }).run();
  }
  if (selectedEdge && edgesByKey.has(selectedEdge)) {
    cy.getElementById(edgesByKey.get(selectedEdge).cyId).select();
  }
  if (selectedNode && nodesById.has(selectedNode)) cy.getElementById(selectedNode).select();
}

// --- table, node list, details ----------------------------------------------------------------

// Rows are kept per edge and updated in place, so a periodic refresh does not replace the
// row someone is about to click (or a test holds).
const rowsByKey = new Map();
const rowData = new WeakMap(); // row -> the JSON its cells show

function edgeCells(e) {
  return [
    el('td', { class: 'id' }, el('button', {
      type: 'button', class: 'row-select',
      'aria-label': `${e.source}: show the connection to ${e.destination} port ${e.port}`,
    }, e.source)),
    el('td', { class: 'id' }, e.destination),
    el('td', { class: 'num' }, text(e.port)),
    el('td', {}, tag(e.decision)),
    el('td', {}, text(e.route)),
    el('td', {}, text(e.rule)),
    el('td', { class: 'num' }, number(e.connections)),
    el('td', { class: 'num' }, number(e.bytes_in)),
    el('td', { class: 'num' }, number(e.bytes_out)),
    el('td', { class: 'nowrap' }, when(e.last_seen)),
  ];
}

function renderTable() {
  const rows = graph.edges.map((e) => {
    const key = edgeKey(e);
    let row = rowsByKey.get(key);
    if (!row) {
      row = el('tr', {
        class: 'clickable',
        dataset: { source: e.source, destination: e.destination, decision: e.decision, port: e.port, key },
        on: { click: () => selectEdge(key) },
      });
      rowsByKey.set(key, row);
    }
    row.classList.toggle('selected', key === selectedEdge);
    const sig = JSON.stringify(e);
    if (rowData.get(row) !== sig) {
      rowData.set(row, sig); // counts and times change; the cells are rebuilt only then
      fill(row, edgeCells(e));
    }
    return row;
  });
  for (const key of [...rowsByKey.keys()]) if (!edgesByKey.has(key)) rowsByKey.delete(key);
  fillRows($('#edges tbody'), rows, 10, 'No connections in this time window.');
}

function renderNodeList() {
  const items = [...nodesById.values()].map((n) => el('li', {}, el('button', {
    type: 'button', class: n.id === selectedNode ? 'selected' : null, dataset: { node: n.id },
    on: { click: () => selectNode(n.id) },
  }, n.id, n.kind === 'address' ? ' (unverified address)' : null, n.team ? ` — team ${n.team}` : null)));
  fill($('#nodes'), items.length ? items : el('li', { class: 'muted' }, 'No nodes in this time window.'));
}

function selectEdge(key) {
  const e = edgesByKey.get(key);
  if (!e) return;
  selectedEdge = key;
  for (const row of document.querySelectorAll('#edges tbody tr')) {
    row.classList.toggle('selected', row.dataset.key === key);
  }
  if (cy) {
    cy.elements().unselect();
    cy.getElementById(e.cyId).select();
  }
  renderEdgeDetails(e);
}

function renderEdgeDetails(e) {
  const nodeButton = (id, label) => el('button', { type: 'button', class: 'small', on: { click: () => selectNode(id) } }, label);
  fill($('#edge-details'),
    el('dl', {},
      el('dt', {}, 'From'), el('dd', {}, el('code', {}, e.source)),
      el('dt', {}, 'To'), el('dd', {}, el('code', {}, e.destination)),
      el('dt', {}, 'Port'), el('dd', {}, text(e.port)),
      el('dt', {}, 'Decision'), el('dd', {}, tag(e.decision)),
      el('dt', {}, 'Deciding rule'), el('dd', {}, text(e.rule)),
      el('dt', {}, 'Route'), el('dd', {}, text(e.route)),
      el('dt', {}, 'Connections'), el('dd', {}, number(e.connections)),
      el('dt', {}, 'Bytes in'), el('dd', {}, bytes(e.bytes_in)),
      el('dt', {}, 'Bytes out'), el('dd', {}, bytes(e.bytes_out)),
      el('dt', {}, 'First seen'), el('dd', {}, when(e.first_seen)),
      el('dt', {}, 'Last seen'), el('dd', {}, when(e.last_seen))),
    el('div', { class: 'node-actions' }, nodeButton(e.source, 'Source details'), nodeButton(e.destination, 'Destination details')));
}

function selectNode(id) {
  const node = nodesById.get(id) || { id, kind: id.startsWith('spiffe://') ? 'identity' : 'address', team: null };
  selectedNode = id;
  for (const button of document.querySelectorAll('#nodes button')) button.classList.toggle('selected', button.dataset.node === id);
  if (cy) {
    cy.elements().unselect();
    cy.getElementById(id).select();
  }
  const out = graph.edges.filter((e) => e.source === id).length;
  const into = graph.edges.filter((e) => e.destination === id).length;
  const traffic = `${out} outgoing, ${into} incoming in this window`;
  const box = $('#node-details');
  if (node.kind === 'address') {
    // An unverified caller has no SPIFFE ID, so there is nothing to ask /api/identity.
    fill(box, el('dl', {},
      el('dt', {}, 'Address'), el('dd', {}, el('code', {}, id)),
      el('dt', {}, 'Kind'), el('dd', {}, tag('unverified'), ' no SPIFFE identity presented'),
      el('dt', {}, 'Connections'), el('dd', {}, traffic)));
    return;
  }
  showIdentity(box, id, [['Team', text(node.team)], ['Connections', traffic]]);
}

// --- loading ----------------------------------------------------------------------------------

function updateTeams(data) {
  for (const t of data.teams || []) if (t) teamsSeen.add(t);
  for (const n of data.nodes) if (n.team) teamsSeen.add(n.team);
  const select = $('#team');
  const current = select.value;
  if (current) teamsSeen.add(current);
  const known = [...select.options].map((o) => o.value).filter(Boolean).sort().join('\n');
  if (known === [...teamsSeen].sort().join('\n')) return; // unchanged: leave the open list alone
  const options = [...teamsSeen].sort().map((t) => el('option', { value: t }, t));
  fill(select, el('option', { value: '' }, 'All teams'), options);
  select.value = current;
}

async function load() {
  const mine = ++request;
  const since = $('#since').value;
  const team = $('#team').value;
  setQuery({ since: since === '1h' ? '' : since, team });
  let data;
  try {
    data = await api.get('/api/graph', { since, team });
  } catch (err) {
    if (mine === request) showError(err);
    return;
  }
  if (mine !== request) return;
  clearMessage();
  graph = { ...data, nodes: data.nodes || [], edges: data.edges || [] };
  nodesById = new Map(graph.nodes.map((n) => [n.id, n]));
  // Endpoints missing from the node list still get a node (the drawing needs both ends).
  for (const e of graph.edges) {
    for (const id of [e.source, e.destination]) {
      if (!nodesById.has(id)) nodesById.set(id, { id, kind: id.startsWith('spiffe://') ? 'identity' : 'address', team: null });
    }
  }
  edgesByKey = new Map(graph.edges.map((e, i) => [edgeKey(e), { ...e, cyId: `edge-${i}` }]));
  updateTeams(graph);
  fill($('#graph-status'), `${graph.nodes.length} nodes, ${graph.edges.length} connections`,
    graph.since ? ` since ${graph.since}` : '', `; updated ${new Date().toISOString().slice(11, 19)}Z`);
  renderTable();
  renderNodeList();
  const empty = $('#graph-empty');
  if (empty) empty.remove();
  if (!graph.edges.length && !graph.nodes.length) {
    $('.graph-panel').prepend(el('p', { id: 'graph-empty', class: 'graph-empty' }, 'No connections in this time window.'));
  }
  draw();
  // The selected connection's figures, as of this refresh (draw() kept the selection).
  if (selectedEdge && edgesByKey.has(selectedEdge)) renderEdgeDetails(edgesByKey.get(selectedEdge));
}

run(async () => {
  const since = queryParam('since', '1h');
  $('#since').value = WINDOWS.includes(since) ? since : '1h';
  const team = queryParam('team');
  if (team) {
    teamsSeen.add(team);
    updateTeams({ nodes: [], teams: [] });
    $('#team').value = team;
  }
  startDrawing();
  $('#since').addEventListener('change', load);
  $('#team').addEventListener('change', load);
  $('#refresh').addEventListener('click', load);
  window.setInterval(() => {
    if (!document.hidden) load();
  }, REFRESH_MS);
  await load();
});
