// Campaigns: start one from a CSV, follow each campaign's progress, pause, resume or cancel it.
// Everything goes through the campaigns API (GET/POST /campaigns…), polled while on the page.
import {api, ApiError} from '../api.js';
import {confirmDialog, h, stateBox, toast} from '../dom.js';
import {dateTime, maskNumber, plural} from '../format.js';
import {mark} from '../probe.js';

const POLL_MS = 2000;
const LIST_PROGRESS = 25; // the newest campaigns whose progress the list shows

const STATUS_TONES = {running: 'live', paused: 'operator', done: 'ok', cancelled: 'neutral'};
const STATE_LABELS = {pending: 'To dial', waiting: 'Waiting to retry', placing: 'Placing',
  in_progress: 'On the line', done: 'Done', skipped: 'Skipped'};

function statusPill(status) {
  return h('span', {class: `pill pill-${STATUS_TONES[status] || 'neutral'}`, dataset: {status}},
    status ? status[0].toUpperCase() + status.slice(1) : '–');
}

// Done and skipped numbers out of all of them, as a bar and as words.
function progressBar(p) {
  const settled = (p.states.done || 0) + (p.states.skipped || 0);
  const pct = p.total ? Math.round((100 * settled) / p.total) : 0;
  const fill = h('div', {class: 'progress-fill'});
  fill.style.width = `${pct}%`; // through the CSSOM: the page's CSP allows no style attributes
  return h('div', {class: 'progress', title: `${settled} of ${p.total} numbers settled`},
    h('div', {class: 'progress-track'}, fill),
    h('span', {class: 'figure'}, `${settled} / ${p.total}`));
}

function outcomePills(outcomes) {
  const entries = Object.entries(outcomes || {});
  if (!entries.length) return h('span', {class: 'muted'}, 'No outcomes yet');
  return h('div', {class: 'endings'}, entries.map(([k, n]) =>
    h('span', {class: `pill pill-${k === 'completed' ? 'ok' : 'neutral'}`, dataset: {outcome: k}}, `${k} · ${n}`)));
}

async function postCsv(query, text) {
  let response;
  try {
    response = await fetch(`/campaigns?${query}`, {method: 'POST', credentials: 'same-origin',
      headers: {Accept: 'application/json', 'Content-Type': 'text/csv'}, body: text});
  } catch {
    throw new ApiError(0, 'The server cannot be reached');
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, (data && data.error) || `${response.status}`, data);
  return data;
}

function newCampaignForm(navigate) {
  const name = h('input', {name: 'name', required: true, placeholder: 'November reminders', 'aria-label': 'Name'});
  const file = h('input', {type: 'file', name: 'csv', accept: '.csv,text/csv', required: true, 'aria-label': 'CSV file'});
  const concurrency = h('input', {type: 'number', name: 'concurrency', min: '1', max: '100', value: '2', 'aria-label': 'Calls at once'});
  const window = h('input', {name: 'window', placeholder: '09:00-18:00', pattern: '\\d{2}:\\d{2}-\\d{2}:\\d{2}', 'aria-label': 'Dialling window'});
  const zone = h('input', {name: 'timezone', value: Intl.DateTimeFormat().resolvedOptions().timeZone || 'UTC',
    'aria-label': 'Time zone of the window'});
  const greeting = h('input', {name: 'greeting', placeholder: 'optional', 'aria-label': 'Greeting'});
  const error = h('p', {class: 'form-error', role: 'alert'});
  const submit = h('button', {class: 'btn btn-primary', type: 'submit'}, 'Start campaign');
  const form = h('form', {class: 'filters card campaign-form', onsubmit: async (event) => {
    event.preventDefault();
    error.textContent = '';
    if (!file.files.length) {
      error.textContent = 'Choose a CSV file with a "to" column.';
      return;
    }
    const query = new URLSearchParams({name: name.value.trim(), concurrency: concurrency.value || '1'});
    if (window.value.trim()) {
      query.set('window', window.value.trim());
      if (zone.value.trim()) query.set('timezone', zone.value.trim());
    }
    if (greeting.value.trim()) query.set('greeting', greeting.value.trim());
    submit.disabled = true;
    try {
      const made = await postCsv(query, await file.files[0].text());
      const skipped = Object.values(made.skipped || {}).reduce((a, b) => a + b, 0);
      toast(`Campaign started: ${plural(made.to_dial, 'number')} to dial${skipped ? `, ${skipped} skipped` : ''}`, 'ok');
      navigate(`/console/campaigns/${encodeURIComponent(made.id)}`);
    } catch (e) {
      error.textContent = e.message;
    } finally {
      submit.disabled = false;
    }
  }},
  h('label', null, h('span', null, 'Name'), name),
  h('label', null, h('span', null, 'Numbers (CSV: a "to" column; other columns become variables)'), file),
  h('label', null, h('span', null, 'Calls at once'), concurrency),
  h('label', null, h('span', null, 'Window (HH:MM-HH:MM)'), window),
  h('label', null, h('span', null, 'Time zone'), zone),
  h('label', null, h('span', null, 'Greeting'), greeting),
  h('div', {class: 'filter-buttons'}, submit),
  error);
  return form;
}

export async function campaignsView(root, {navigate, alive}) {
  const list = h('div', {class: 'card table-card'}, stateBox('loading', 'Loading campaigns…'));
  root.append(
    h('div', {class: 'page-head'}, h('div', null, h('h1', null, 'Campaigns'),
      h('p', {class: 'muted'}, 'Lists of numbers the assistant calls, a few at a time, within their hours. Do-not-call numbers are never dialled.'))),
    newCampaignForm(navigate), list);

  let timer = null;
  async function load() {
    let found;
    try {
      found = (await api('/campaigns')).campaigns;
      const progress = await Promise.all(found.slice(0, LIST_PROGRESS).map((c) =>
        api(`/campaigns/${encodeURIComponent(c.id)}`).catch(() => null)));
      found.forEach((c, i) => { c.progress = progress[i] || null; });
    } catch (error) {
      if (alive()) list.replaceChildren(stateBox('error', 'The campaigns cannot be loaded', error.message));
      return;
    }
    if (!alive()) return;
    if (!found.length) {
      list.replaceChildren(stateBox('empty', 'No campaigns yet', 'Start one above from a CSV of numbers.'));
    } else {
      const body = h('tbody', null, found.map((c) => {
        const href = `/console/campaigns/${encodeURIComponent(c.id)}`;
        return h('tr', {dataset: {id: c.id}, onclick: (e) => { if (!e.target.closest('a')) navigate(href); }},
          h('td', null, h('a', {href, class: 'number'}, c.name), h('span', {class: 'sub'}, c.id)),
          h('td', null, statusPill(c.status)),
          h('td', null, c.progress ? progressBar(c.progress) : h('span', {class: 'muted'}, '–')),
          h('td', null, c.progress ? outcomePills(c.progress.outcomes) : null),
          h('td', null, dateTime(c.created_at), c.created_by ? h('span', {class: 'sub'}, `by ${c.created_by}`) : null));
      }));
      list.replaceChildren(h('table', {class: 'calls-table campaigns-table'},
        h('thead', null, h('tr', null, h('th', null, 'Campaign'), h('th', null, 'Status'),
          h('th', null, 'Progress'), h('th', null, 'Outcomes'), h('th', null, 'Started'))), body));
    }
    mark('campaigns.rows', {n: found.length});
    timer = setTimeout(load, POLL_MS);
  }
  await load();
  return () => clearTimeout(timer);
}

function setting(label, value) {
  return [h('dt', null, label), h('dd', null, value === null || value === undefined || value === '' ? '–' : String(value))];
}

export async function campaignView(root, {params, alive}) {
  const [id] = params;
  const path = `/campaigns/${encodeURIComponent(id)}`;
  const head = h('div', {class: 'page-head'});
  const summary = h('div', {class: 'card campaign-summary'}, stateBox('loading', 'Loading the campaign…'));
  const numbers = h('div', {class: 'card table-card'});
  root.append(head, summary, numbers);

  let timer = null;

  async function act(action) {
    if (action === 'cancel' && !await confirmDialog('Cancel this campaign?',
      'Numbers not yet dialled are skipped; calls on the line go on to their end.', 'Cancel campaign', true)) return;
    try {
      await api(`${path}/${action}`, {method: 'POST'});
      toast(`Campaign ${action === 'pause' ? 'paused' : action === 'resume' ? 'resumed' : 'cancelled'}`, 'ok');
    } catch (error) {
      toast(error.message, 'error');
    }
    clearTimeout(timer);
    await load();
  }

  function render(p) {
    const open = p.status === 'running' || p.status === 'paused';
    head.replaceChildren(
      h('div', null, h('a', {href: '/console/campaigns', class: 'muted'}, '← Campaigns'),
        h('h1', null, p.name, ' ', statusPill(p.status)),
        h('p', {class: 'muted'}, `Started ${dateTime(p.created_at)}${p.created_by ? ` by ${p.created_by}` : ''} · ${plural(p.attempts, 'attempt')}`)),
      h('div', {class: 'head-actions'},
        h('button', {class: 'btn', disabled: p.status !== 'running', onclick: () => act('pause')}, 'Pause'),
        h('button', {class: 'btn', disabled: p.status !== 'paused', onclick: () => act('resume')}, 'Resume'),
        h('button', {class: 'btn btn-danger', disabled: !open, onclick: () => act('cancel')}, 'Cancel')));
    const s = p.settings || {};
    const retries = Object.entries(s.retries || {}).map(([k, n]) => `${k} ×${n}`).join(', ');
    summary.replaceChildren(
      h('div', {class: 'card-head'}, h('strong', null, 'Progress'), progressBar(p)),
      h('div', {class: 'campaign-body'},
        h('div', {class: 'state-counts'}, Object.entries(p.states).map(([k, n]) =>
          h('span', {class: 'chip', dataset: {state: k}}, `${STATE_LABELS[k] || k}: ${n}`))),
        outcomePills(p.outcomes),
        h('dl', {class: 'settings-list'},
          setting('Calls at once', s.concurrency),
          setting('Window', s.window ? `${s.window.start}–${s.window.end} ${s.window.timezone}` : 'any time'),
          setting('Retries', retries || 'none'),
          setting('Voicemail', s.voicemail),
          setting('Model API', s.model_api || 'the bridge’s (MODEL_API)'),
          setting('Greeting', s.greeting))));
  }

  function renderNumbers(calls) {
    const body = h('tbody', null, calls.map((c) => h('tr', {dataset: {seq: c.seq, state: c.state}},
      h('td', {class: 'num'}, c.seq),
      h('td', {class: 'number'}, maskNumber(c.number)),
      h('td', null, STATE_LABELS[c.state] || c.state),
      h('td', null, c.outcome || '–', c.answered_by ? h('span', {class: 'sub'}, c.answered_by) : null),
      h('td', {class: 'num'}, c.attempts),
      h('td', null, c.state === 'waiting' && c.next_at ? dateTime(new Date(c.next_at * 1000).toISOString()) : '–'),
      h('td', null, c.call_sid ? h('a', {href: `/console/history/${encodeURIComponent(c.call_sid)}`}, 'Call') : '–'))));
    numbers.replaceChildren(h('table', {class: 'calls-table campaign-numbers'},
      h('thead', null, h('tr', null, h('th', {class: 'num'}, '#'), h('th', null, 'Number'), h('th', null, 'State'),
        h('th', null, 'Outcome'), h('th', {class: 'num'}, 'Attempts'), h('th', null, 'Next try'), h('th', null, 'Last call'))),
      body));
  }

  async function load() {
    let p;
    try {
      p = await api(`${path}?calls=1`);
    } catch (error) {
      if (!alive()) return;
      head.replaceChildren(h('a', {href: '/console/campaigns', class: 'muted'}, '← Campaigns'));
      summary.replaceChildren(stateBox('error', error.status === 404 ? 'There is no such campaign'
        : 'The campaign cannot be loaded', error.message));
      numbers.replaceChildren();
      if (error.status !== 404) timer = setTimeout(load, POLL_MS);
      return;
    }
    if (!alive()) return;
    render(p);
    renderNumbers(p.calls || []);
    mark('campaign.progress', {status: p.status, settled: (p.states.done || 0) + (p.states.skipped || 0)});
    const settling = (p.states.placing || 0) + (p.states.in_progress || 0) > 0;
    if (p.status === 'running' || p.status === 'paused' || settling) timer = setTimeout(load, POLL_MS);
  }
  await load();
  return () => clearTimeout(timer);
}
