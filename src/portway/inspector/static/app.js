// Portway inspector page. Plain DOM, no build step. Everything captured comes from the internet (visitors'
// requests) or the local service, so it is only ever put in the page as text (textContent), never as HTML.
'use strict';

const state = {
  rows: new Map(), // id -> summary
  selected: null, // id
  detail: null, // the selected exchange, in full
  tab: 'request',
  refetch: null,
};

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `${response.status}`);
  return body;
}

// ---------------------------------------------------------------------------------------------
// formatting

function size(bytes) {
  if (bytes === null || bytes === undefined) return '';
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
}

function ms(value) {
  if (value === null || value === undefined) return '';
  return value < 10 ? `${value.toFixed(2)} ms` : `${Math.round(value)} ms`;
}

function clock(epoch) {
  const date = new Date(epoch * 1000);
  return date.toLocaleTimeString([], { hour12: false }) + '.' + String(date.getMilliseconds()).padStart(3, '0');
}

function statusClass(summary) {
  if (summary.state === 'error' || summary.state === 'incomplete') return 's-error';
  if (summary.status === null) return 's-pending';
  return `s-${Math.floor(summary.status / 100)}xx`;
}

function statusText(summary) {
  if (summary.websocket) return summary.state === 'websocket' ? '101 open' : '101 closed';
  if (summary.status !== null) return String(summary.status);
  if (summary.state === 'error' || summary.state === 'incomplete') return 'failed';
  return '…';
}

function bytesOf(base64) {
  const raw = atob(base64);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

// ---------------------------------------------------------------------------------------------
// the list

function filters() {
  return {
    method: $('#filter-method').value,
    status: $('#filter-status').value,
    path: $('#filter-path').value.trim().toLowerCase(),
  };
}

function matches(summary, wanted) {
  if (wanted.method) {
    if (wanted.method === 'WS') {
      if (!summary.websocket) return false;
    } else if (summary.method.toUpperCase() !== wanted.method) return false;
  }
  if (wanted.status) {
    if (wanted.status === 'pending') {
      if (summary.status !== null) return false;
    } else if (summary.status === null || String(summary.status)[0] !== wanted.status[0]) return false;
  }
  if (wanted.path && !summary.path.toLowerCase().includes(wanted.path)) return false;
  return true;
}

function row(summary) {
  const method = el('td', { class: 'method' }, summary.websocket ? el('span', { class: 'badge ws', text: 'WS' }) : null,
    summary.method);
  const path = el('td', { class: 'path', title: summary.path }, summary.path);
  if (summary.replay_of !== null) {
    path.prepend(el('span', { class: 'badge replay', text: `replay of #${summary.replay_of}` }));
  }
  const time = summary.websocket ? `${summary.message_count} msgs` : ms(summary.duration_ms);
  return el('tr', {
    'data-id': summary.id,
    class: (summary.id === state.selected ? 'selected ' : '') + statusClass(summary),
    onclick: () => select(summary.id),
  },
  el('td', { class: 'id', text: summary.id }),
  method,
  path,
  el('td', { class: 'status', text: statusText(summary), title: summary.error || summary.reason || '' }),
  el('td', { class: 'time', text: time }),
  el('td', { class: 'size', text: size(summary.response_size) }));
}

function renderList() {
  const wanted = filters();
  const body = $('#list tbody');
  const ids = [...state.rows.keys()].sort((a, b) => b - a);
  const rows = ids.map((id) => state.rows.get(id)).filter((summary) => matches(summary, wanted)).map(row);
  body.replaceChildren(...rows);
  $('#empty').hidden = state.rows.size > 0;
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(wanted)) if (value) query.set(key, value);
  $('#export').href = '/api/requests.har' + (query.toString() ? `?${query}` : '');
  renderDiffChoices();
}

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    renderList();
  });
}

async function loadList() {
  const { requests } = await api('/api/requests');
  state.rows = new Map(requests.map((summary) => [summary.id, summary]));
  renderList();
}

function connect() {
  const events = new EventSource('/api/events');
  const live = $('#live');
  events.onopen = () => {
    live.className = 'live on';
    live.textContent = 'live';
    loadList();
  };
  events.onerror = () => {
    live.className = 'live off';
    live.textContent = 'reconnecting';
  };
  events.addEventListener('exchange', (event) => {
    const summary = JSON.parse(event.data);
    state.rows.set(summary.id, summary);
    scheduleRender();
    if (summary.id === state.selected) scheduleRefetch();
  });
  events.addEventListener('evicted', (event) => {
    for (const id of JSON.parse(event.data).ids) state.rows.delete(id);
    scheduleRender();
  });
  events.addEventListener('cleared', () => {
    state.rows.clear();
    scheduleRender();
  });
}

// ---------------------------------------------------------------------------------------------
// one exchange

function scheduleRefetch() {
  if (state.refetch) return;
  state.refetch = setTimeout(async () => {
    state.refetch = null;
    if (state.selected !== null) await showDetail(state.selected, false);
  }, 250);
}

async function select(id) {
  state.selected = id;
  for (const tr of document.querySelectorAll('#list tbody tr')) {
    tr.classList.toggle('selected', Number(tr.dataset.id) === id);
  }
  $('#editor').hidden = true;
  $('#diff-with').replaceChildren(); // its choice belonged to the previous exchange
  await showDetail(id, true);
}

async function showDetail(id, fresh) {
  let detail;
  try {
    detail = await api(`/api/requests/${id}`);
  } catch (error) {
    $('#nothing').textContent = `#${id}: ${error.message}`;
    $('#nothing').hidden = false;
    $('#detail').hidden = true;
    return;
  }
  if (state.selected !== id) return;
  state.detail = detail;
  state.rows.set(id, { ...state.rows.get(id), ...detail, messages: undefined });
  $('#nothing').hidden = true;
  $('#detail').hidden = false;
  renderSummary(detail);
  renderRequest(detail);
  renderResponse(detail);
  renderMessages(detail);
  renderRaw(detail);
  renderTiming(detail);
  $('#tabs button[data-tab="messages"]').hidden = !detail.websocket;
  if (fresh) {
    $('#tabs button[data-tab="diffview"]').hidden = true;
    showTab(detail.websocket ? 'messages' : (state.tab === 'diffview' || state.tab === 'messages' ? 'request' : state.tab));
  }
  $('#replay').disabled = detail.websocket;
  $('#edit').disabled = detail.websocket;
  renderDiffChoices();
}

function showTab(name) {
  state.tab = name;
  for (const button of document.querySelectorAll('#tabs button')) {
    button.classList.toggle('active', button.dataset.tab === name);
  }
  for (const tab of document.querySelectorAll('.tab')) tab.hidden = tab.id !== `tab-${name}`;
}

function renderSummary(detail) {
  const response = detail.response;
  const parts = [
    el('span', { class: 'method', text: detail.method }),
    el('span', { class: 'path', text: detail.path }),
    el('span', { class: 'arrow', text: '→' }),
    el('span', { class: `status ${statusClass(detail)}`, text: response ? `${response.status} ${response.reason}` : statusText(detail) }),
  ];
  const facts = [];
  if (detail.duration_ms !== null) facts.push(ms(detail.duration_ms));
  facts.push(clock(detail.started));
  if (detail.remote_addr) facts.push(`from ${detail.remote_addr}`);
  facts.push(`connection #${detail.connection}`);
  if (detail.replay_of !== null) facts.push(`replay of #${detail.replay_of}`);
  const summary = $('#summary');
  summary.replaceChildren(el('div', { class: 'line' }, ...parts), el('div', { class: 'facts muted', text: facts.join(' · ') }));
  if (detail.error) summary.append(el('div', { class: 'error', text: detail.error }));
}

function table(rows, headings, className) {
  if (!rows.length) return el('p', { class: 'muted', text: 'none' });
  return el('table', { class: `kv ${className || ''}` },
    headings ? el('thead', {}, el('tr', {}, ...headings.map((text) => el('th', { text })))) : null,
    el('tbody', {}, ...rows.map(([name, value]) => el('tr', {}, el('th', { text: name }), el('td', { text: value })))));
}

function section(title, ...content) {
  return el('section', { class: 'part' }, el('h3', { text: title }), ...content);
}

// JSON with its tokens coloured (spans with text only)
function highlightJson(text) {
  const pre = el('pre', { class: 'json' });
  const token = /("(?:\\.|[^"\\])*")(\s*:)?|\b(true|false|null)\b|(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)/g;
  let last = 0;
  for (const match of text.matchAll(token)) {
    if (match.index > last) pre.append(text.slice(last, match.index));
    if (match[1]) {
      pre.append(el('span', { class: match[2] ? 'j-key' : 'j-str', text: match[1] }));
      if (match[2]) pre.append(match[2]);
    } else if (match[3]) pre.append(el('span', { class: 'j-lit', text: match[3] }));
    else pre.append(el('span', { class: 'j-num', text: match[4] }));
    last = match.index + match[0].length;
  }
  pre.append(text.slice(last));
  return pre;
}

function bodyBlock(part) {
  const view = part.view;
  const blocks = [];
  if (part.body_truncated) {
    blocks.push(el('p', { class: 'note', text: `Showing the first ${size(part.body_base64 ? atob(part.body).length : new TextEncoder().encode(part.body).length)} of ${size(part.body_size)} (capture limit).` }));
  }
  if (view.note) blocks.push(el('p', { class: 'note', text: view.note }));
  if (view.decoded) blocks.push(el('p', { class: 'muted', text: `Content-Encoding: ${view.decoded}, shown decoded` }));
  const bodyText = view.text !== undefined ? view.text : part.body;
  if (view.kind === 'empty') {
    blocks.push(el('p', { class: 'muted', text: part.body_size ? `${size(part.body_size)} (not kept)` : 'no body' }));
  } else if (view.kind === 'json' && view.pretty !== undefined) {
    blocks.push(highlightJson(view.pretty));
  } else if (view.kind === 'json') {
    const { message, line, column, offset } = view.error;
    blocks.push(el('p', { class: 'error', text: `JSON syntax error: ${message} at line ${line}, column ${column}` }));
    const text = bodyText;
    blocks.push(el('pre', { class: 'json-error' }, text.slice(0, offset),
      el('mark', { class: 'json-error-at', text: text.slice(offset, offset + 1) || ' ' }), text.slice(offset + 1)));
  } else if (view.kind === 'form') {
    blocks.push(table(view.fields, null, 'form'));
  } else if (view.kind === 'image') {
    const bytes = view.data !== undefined ? bytesOf(view.data)
      : part.body_base64 ? bytesOf(part.body) : new TextEncoder().encode(part.body);
    const url = URL.createObjectURL(new Blob([bytes], { type: view.mime }));
    blocks.push(el('img', { class: 'preview', src: url, alt: view.mime }));
  } else if (view.kind === 'binary') {
    blocks.push(el('pre', { class: 'hex', text: view.hex }));
    if (view.hex_truncated) blocks.push(el('p', { class: 'note', text: 'hex dump of the first 64 KiB' }));
  } else {
    blocks.push(el('pre', { class: 'text', text: bodyText }));
  }
  return blocks;
}

function headerRows(headers) {
  return headers.map(([name, value]) => [name, value]);
}

function renderRequest(detail) {
  const request = detail.request;
  const tab = $('#tab-request');
  tab.replaceChildren(...[
    el('pre', { class: 'request-line', text: `${request.method} ${request.path} HTTP/${request.http_version}` }),
    request.query.length ? section('Query parameters', table(request.query, null, 'query')) : null,
    section('Headers', table(headerRows(request.headers), null, 'headers')),
    section(`Body ${request.body_size ? `(${size(request.body_size)})` : ''}`, ...bodyBlock(request)),
  ].filter(Boolean));
}

function renderResponse(detail) {
  const response = detail.response;
  const tab = $('#tab-response');
  if (!response) {
    tab.replaceChildren(el('p', { class: 'muted', text: detail.error || 'No response yet.' }));
    return;
  }
  tab.replaceChildren(...[
    el('pre', { class: 'status-line', text: `HTTP/${response.http_version} ${response.status} ${response.reason}` }),
    response.informational.length ? el('p', { class: 'muted', text: `after ${response.informational.join(', ')}` }) : null,
    section('Headers', table(headerRows(response.headers), null, 'headers')),
    section(`Body ${response.body_size ? `(${size(response.body_size)})` : ''}`, el('div', { id: 'response-body' }, ...bodyBlock(response))),
  ].filter(Boolean));
}

function renderMessages(detail) {
  const tab = $('#tab-messages');
  if (!detail.websocket) {
    tab.replaceChildren();
    return;
  }
  const counts = detail.message_counts || {};
  const head = el('p', { class: 'muted', text:
    `${counts.visitor || 0} from the visitor, ${counts.service || 0} from the service` +
    (detail.messages_dropped ? ` · ${detail.messages_dropped} older not kept` : '') +
    (detail.websocket_compressed ? ' · permessage-deflate' : '') +
    (detail.websocket_closed ? ' · closed' : ' · open') });
  const rows = detail.messages.map((message) => {
    let content;
    if (message.kind === 'close') {
      content = `close ${message.close_code ?? ''} ${message.close_reason || ''}`.trim();
    } else if (message.base64) {
      const bytes = bytesOf(message.data).slice(0, 32);
      content = [...bytes].map((b) => b.toString(16).padStart(2, '0')).join(' ') + (message.size > 32 ? ' …' : '');
    } else content = message.text + (message.truncated ? ' …' : '');
    const fromVisitor = message.from === 'visitor';
    return el('tr', { class: `msg ${fromVisitor ? 'out' : 'in'} k-${message.kind}` },
      el('td', { class: 'time', text: clock(message.time) }),
      el('td', { class: 'dir', text: fromVisitor ? '↑ visitor' : '↓ service', title: fromVisitor ? 'visitor → service' : 'service → visitor' }),
      el('td', { class: 'kind', text: message.kind }),
      el('td', { class: 'size', text: size(message.size) }),
      el('td', { class: 'data', text: content }));
  });
  tab.replaceChildren(head, rows.length
    ? el('table', { class: 'messages' }, el('thead', {}, el('tr', {}, ...['time', 'direction', 'type', 'size', 'data'].map((text) => el('th', { text })))), el('tbody', {}, ...rows))
    : el('p', { class: 'muted', text: 'No messages yet.' }));
}

function rawBody(part) {
  if (!part.body_size) return '';
  if (part.body_base64) return `[${size(part.body_size)} of binary data]`;
  return part.body + (part.body_truncated ? `\n[… ${size(part.body_size)} in all]` : '');
}

function renderRaw(detail) {
  const text = detail.request.raw_head + rawBody(detail.request) +
    (detail.response ? '\n\n' + detail.response.raw_head + rawBody(detail.response) : '');
  $('#tab-raw').replaceChildren(el('pre', { class: 'raw', text }));
}

function renderTiming(detail) {
  const timing = detail.timing;
  const total = timing.total_ms || Math.max(timing.request_ms || 0, 0.001);
  let offset = 0;
  const bar = (label, value, className) => {
    const div = el('div', { class: `bar ${className}` });
    div.style.marginLeft = `${(offset / total) * 100}%`;
    div.style.width = `${Math.max(((value || 0) / total) * 100, 0.5)}%`;
    offset += value || 0;
    return el('tr', {}, el('th', { text: label }), el('td', { class: 'bar-cell' }, div), el('td', { class: 'num', text: ms(value) }));
  };
  const rows = [
    bar('request sent', timing.request_ms, 'send'),
    bar('waiting', timing.wait_ms, 'wait'),
    bar('response received', timing.response_ms, 'receive'),
  ];
  $('#tab-timing').replaceChildren(
    el('table', { class: 'timing' }, el('tbody', {}, ...rows)),
    el('p', { class: 'muted', text: `total ${ms(timing.total_ms)}, started ${new Date(timing.started * 1000).toISOString()}` }),
  );
}

// ---------------------------------------------------------------------------------------------
// replay, edit, diff

async function replay(edits) {
  const options = { method: 'POST', headers: { 'Content-Type': 'application/json' } };
  if (edits) options.body = JSON.stringify(edits);
  const { id } = await api(`/api/requests/${state.selected}/replay`, options);
  const summary = await api(`/api/requests/${id}`);
  state.rows.set(id, summary);
  renderList();
  await select(id);
  return id;
}

function openEditor() {
  const request = state.detail.request;
  $('#edit-method').value = request.method;
  $('#edit-path').value = request.path;
  $('#edit-headers').value = request.headers.map(([name, value]) => `${name}: ${value}`).join('\n');
  $('#edit-body').value = request.body_base64 ? '' : request.body;
  $('#edit-body').placeholder = request.body_base64 ? 'binary body: replace it with text, or leave empty' : '';
  $('#edit-error').textContent = '';
  $('#editor').hidden = false;
}

async function sendEdited(event) {
  event.preventDefault();
  const headers = $('#edit-headers').value.split('\n').filter((line) => line.trim()).map((line) => {
    const colon = line.indexOf(':');
    return colon < 0 ? [line.trim(), ''] : [line.slice(0, colon).trim(), line.slice(colon + 1).trim()];
  });
  const edits = { method: $('#edit-method').value.trim(), path: $('#edit-path').value.trim(), headers, body: $('#edit-body').value };
  try {
    $('#editor').hidden = true;
    await replay(edits);
  } catch (error) {
    $('#editor').hidden = false;
    $('#edit-error').textContent = error.message;
  }
}

function renderDiffChoices() {
  const select = $('#diff-with');
  if (state.selected === null) return;
  const current = select.value;
  const detail = state.detail;
  const ids = [...state.rows.keys()].filter((id) => id !== state.selected && !state.rows.get(id).websocket).sort((a, b) => b - a);
  select.replaceChildren(...ids.map((id) => {
    const summary = state.rows.get(id);
    return el('option', { value: id, text: `#${id} ${summary.method} ${summary.path} ${summary.status ?? ''}` });
  }));
  const replays = ids.filter((id) => state.rows.get(id).replay_of === state.selected);
  const preferred = current && ids.includes(Number(current)) ? current
    : detail && detail.replay_of !== null && ids.includes(detail.replay_of) ? String(detail.replay_of)
      : replays.length ? String(replays[0]) : null;
  if (preferred) select.value = preferred;
  $('#diff').disabled = ids.length === 0 || (detail && detail.websocket);
}

async function showDiff() {
  const other = Number($('#diff-with').value);
  if (!other) return;
  const diff = await api(`/api/diff?a=${other}&b=${state.selected}`);
  const status = el('p', { class: diff.status.changed ? 'changed' : 'same' },
    `status: #${diff.a} ${diff.status.a ?? '—'} → #${diff.b} ${diff.status.b ?? '—'}`);
  const headerRows = diff.headers.map((header) => el('tr', { class: header.change, 'data-header': header.name.toLowerCase() },
    el('td', { class: 'mark', text: { same: '', changed: '~', added: '+', removed: '−' }[header.change] }),
    el('th', { text: header.name }),
    el('td', { class: 'a', text: header.a ?? '' }),
    el('td', { class: 'b', text: header.b ?? '' })));
  const headers = el('table', { class: 'diff-headers' },
    el('thead', {}, el('tr', {}, el('th'), el('th', { text: 'header' }), el('th', { text: `#${diff.a}` }), el('th', { text: `#${diff.b}` }))),
    el('tbody', {}, ...headerRows));
  let body;
  if (diff.body_binary) {
    body = el('p', { class: diff.body_same ? 'same' : 'changed', text: diff.body_same ? 'binary bodies, identical' : 'binary bodies, different' });
  } else if (diff.body_same) {
    body = el('p', { class: 'same', text: 'bodies identical' });
  } else {
    body = el('pre', { class: 'diff-body' }, ...diff.body.map((line) => el('div', { class: { ' ': 'ctx', '-': 'del', '+': 'add' }[line.op], text: `${line.op} ${line.text}` })));
  }
  $('#tab-diffview').replaceChildren(
    el('h3', { text: `Responses of #${diff.a} and #${diff.b}` }), status,
    section('Headers', headers), section('Body', body),
  );
  $('#tabs button[data-tab="diffview"]').hidden = false;
  showTab('diffview');
}

// ---------------------------------------------------------------------------------------------

function init() {
  for (const id of ['#filter-method', '#filter-status']) $(id).addEventListener('change', renderList);
  $('#filter-path').addEventListener('input', renderList);
  $('#filters').addEventListener('submit', (event) => event.preventDefault());
  $('#clear').addEventListener('click', async () => {
    await api('/api/requests', { method: 'DELETE' });
    state.rows.clear();
    state.selected = null;
    $('#detail').hidden = true;
    $('#nothing').hidden = false;
    renderList();
  });
  $('#replay').addEventListener('click', () => replay(null).catch((error) => alert(error.message)));
  $('#edit').addEventListener('click', openEditor);
  $('#edit-cancel').addEventListener('click', () => { $('#editor').hidden = true; });
  $('#editor').addEventListener('submit', sendEdited);
  $('#diff').addEventListener('click', () => showDiff().catch((error) => alert(error.message)));
  for (const button of document.querySelectorAll('#tabs button')) {
    button.addEventListener('click', () => showTab(button.dataset.tab));
  }
  api('/api/status').then((status) => {
    $('#local').textContent = `→ ${status.local}`;
  }).catch(() => {});
  connect();
}

init();
