// Past calls: filters (date, number, ending) kept in the URL, two charts from GET /stats
// (calls per hour, response latency), and the list from GET /calls, a page at a time.
import {api} from '../api.js';
import {barChart, chartCard, fitted} from '../charts.js';
import {h, stateBox} from '../dom.js';
import {dateTime, duration, ending, ENDINGS, ms, plural, usd} from '../format.js';
import {icon} from '../icons.js';
import {mark} from '../probe.js';

const PAGE = 50;
const DAY_MS = 86400000;

function isoDay(date) {
  const pad = (n) => String(n).padStart(2, '0');
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}`;
}

// A local calendar day's start as a UTC ISO time (the API takes either).
function dayStart(day) {
  const [y, m, d] = day.split('-').map(Number);
  return new Date(y, m - 1, d).toISOString();
}

function perHourBars(stats, sinceMs, untilMs) {
  const counts = new Map((stats.per_hour || []).map((p) => [Date.parse(p.hour), p.calls]));
  const hours = Math.ceil((untilMs - sinceMs) / 3600000);
  const byDay = hours > 72;
  const bars = [];
  if (byDay) {
    const days = new Map();
    for (const [t, n] of counts) {
      const key = isoDay(new Date(t));
      days.set(key, (days.get(key) || 0) + n);
    }
    for (let t = new Date(new Date(sinceMs).toDateString()).getTime(); t < untilMs; t += DAY_MS) {
      const key = isoDay(new Date(t));
      const label = new Date(t).toLocaleDateString([], {day: 'numeric', month: 'short'});
      bars.push({label, value: days.get(key) || 0, title: `${label}: ${plural(days.get(key) || 0, 'call')}`});
    }
  } else {
    const first = Math.floor(sinceMs / 3600000) * 3600000;
    for (let t = first; t < untilMs; t += 3600000) {
      const d = new Date(t);
      const label = d.toLocaleTimeString([], {hour: '2-digit'});
      const n = counts.get(t) || 0;
      bars.push({label, value: n, title: `${d.toLocaleString([], {weekday: 'short', hour: '2-digit', minute: '2-digit'})}: ${plural(n, 'call')}`});
    }
  }
  return {bars, byDay};
}

export async function historyView(root, {query, navigate, alive}) {
  const filters = {from: query.get('from') || '', to: query.get('to') || '',
    number: query.get('number') || '', end_kind: query.get('end_kind') || ''};

  const from = h('input', {type: 'date', name: 'from', value: filters.from, 'aria-label': 'From'});
  const to = h('input', {type: 'date', name: 'to', value: filters.to, 'aria-label': 'To'});
  const number = h('input', {type: 'search', name: 'number', value: filters.number, placeholder: '+15551234567',
    'aria-label': 'Phone number', inputmode: 'tel', autocomplete: 'off'});
  const kinds = Object.keys(ENDINGS);
  if (filters.end_kind && !kinds.includes(filters.end_kind)) kinds.push(filters.end_kind);
  const kind = h('select', {name: 'end_kind', 'aria-label': 'Ending'},
    h('option', {value: ''}, 'Any ending'),
    kinds.map((k) => h('option', {value: k, selected: k === filters.end_kind}, ending(k)[0])));
  const form = h('form', {class: 'filters card', onsubmit: (e) => { e.preventDefault(); apply(); }},
    h('label', null, h('span', null, 'From'), from),
    h('label', null, h('span', null, 'To'), to),
    h('label', null, h('span', null, 'Number'), number),
    h('label', null, h('span', null, 'Ending'), kind),
    h('div', {class: 'filter-buttons'},
      h('button', {class: 'btn btn-primary', type: 'submit'}, 'Apply'),
      h('button', {class: 'btn btn-quiet', type: 'button', onclick: () => navigate('/console/history')}, 'Reset')));

  function apply(extra = {}) {
    const next = new URLSearchParams();
    const values = {from: from.value, to: to.value, number: number.value.trim(), end_kind: kind.value, ...extra};
    for (const [key, value] of Object.entries(values)) if (value) next.set(key, value);
    const qs = next.toString();
    navigate(`/console/history${qs ? `?${qs}` : ''}`);
  }

  const charts = h('div', {class: 'charts'}, stateBox('loading', 'Loading the charts…'));
  const stops = [];
  const list = h('div', {class: 'card table-card'}, stateBox('loading', 'Loading calls…'));
  const filtered = Object.values(filters).some(Boolean);
  root.append(
    h('div', {class: 'page-head'}, h('div', null, h('h1', null, 'History'),
      h('p', {class: 'muted'}, 'Finished calls: what was said, how fast, how they ended. Open one to play its recording.'))),
    form, charts, list);

  // --- charts ---
  const untilMs = filters.to ? Date.parse(dayStart(filters.to)) + DAY_MS : Date.now();
  const sinceMs = filters.from ? Date.parse(dayStart(filters.from)) : untilMs - DAY_MS;
  const statsQuery = new URLSearchParams({since: new Date(sinceMs).toISOString()});
  if (filters.to) statsQuery.set('until', new Date(untilMs).toISOString());
  api(`/stats?${statsQuery}`).then((stats) => {
    if (!alive()) return;
    const {bars, byDay} = perHourBars(stats, sinceMs, untilMs);
    const latency = stats.latency_ms || {buckets: []};
    const latencyBars = latency.buckets.map((b) => ({
      label: b.to === null ? `>${b.from / 1000}s` : b.to >= 1000 ? `${b.to / 1000}s` : `${b.to}`,
      value: b.count, tone: b.from >= 1500 ? 'slow' : null,
      title: `${b.to === null ? `over ${ms(b.from)}` : `${ms(b.from)}–${ms(b.to)}`}: ${plural(b.count, 'reply', 'replies')}`,
    }));
    const perHour = h('div', {class: 'chart-fit chart-calls'});
    const hist = h('div', {class: 'chart-fit chart-latency'});
    const endings = h('div', {class: 'endings'}, (stats.endings || []).map((e) => {
      const [label, tone] = ending(e.kind);
      return h('button', {type: 'button', class: `pill pill-${tone} pill-button`, title: e.kind ? `Show only: ${label}` : '',
        onclick: () => e.kind && apply({end_kind: e.kind})}, `${label} · ${e.calls}`);
    }));
    charts.replaceChildren(
      chartCard(`Calls per ${byDay ? 'day' : 'hour'}`, plural(stats.calls, 'call'), perHour,
        stats.calls ? endings : h('span', {class: 'muted'}, 'No calls in this period.')),
      chartCard('Response latency', latency.count ? `median ≈ ${ms(latency.p50)} · p90 ≈ ${ms(latency.p90)}` : 'no replies yet', hist,
        h('span', {class: 'muted'}, 'From the caller’s end of speech to the first reply audio (ms), every reply in the period.')));
    stops.push(fitted(perHour, (width) => barChart(bars, {width, ariaLabel: `Calls per ${byDay ? 'day' : 'hour'}`})));
    stops.push(fitted(hist, (width) => barChart(latencyBars, {width, ariaLabel: 'Response latency distribution'})));
    mark('charts', {bars: bars.length});
  }).catch((error) => {
    if (alive()) charts.replaceChildren(stateBox('error', 'The charts cannot be loaded', error.message));
  });

  // --- the list ---
  const body = h('tbody');
  const more = h('button', {class: 'btn btn-quiet', onclick: () => load()}, 'Load more');
  const table = h('table', {class: 'calls-table history-table'},
    h('thead', null, h('tr', null, h('th', null, 'Started'), h('th', null, 'Caller'), h('th', null, 'Direction'),
      h('th', {class: 'num'}, 'Duration'), h('th', null, 'Ending'), h('th', {class: 'num'}, 'Cost'), h('th', null, 'Recording'))),
    body);
  let cursor = null;
  async function load() {
    const params = new URLSearchParams({limit: String(PAGE)});
    if (filters.from) params.set('since', dayStart(filters.from));
    if (filters.to) params.set('until', new Date(Date.parse(dayStart(filters.to)) + DAY_MS).toISOString());
    if (filters.number) params.set('number', filters.number);
    if (filters.end_kind) params.set('end_kind', filters.end_kind);
    if (cursor) params.set('cursor', cursor);
    more.disabled = true;
    let page;
    try {
      page = await api(`/calls?${params}`);
    } catch (error) {
      if (alive()) list.replaceChildren(stateBox('error', 'The calls cannot be loaded', error.message,
        h('button', {class: 'btn btn-quiet', onclick: () => load()}, 'Try again')));
      return;
    }
    if (!alive()) return;
    for (const call of page.calls) {
      const [label, tone] = ending(call.end_kind);
      const href = `/console/history/${encodeURIComponent(call.call_sid)}`;
      const row = h('tr', {dataset: {sid: call.call_sid}, onclick: (e) => { if (!e.target.closest('a')) navigate(href); }},
        h('td', null, dateTime(call.started_at)),
        h('td', null, h('a', {href, class: 'number'}, call.from || 'Unknown'), call.to ? h('span', {class: 'sub'}, `to ${call.to}`) : null),
        h('td', {class: 'direction'}, icon(call.direction === 'outbound' ? 'outbound' : 'inbound'), call.direction === 'outbound' ? 'Outbound' : 'Inbound'),
        h('td', {class: 'num'}, duration(call.duration_seconds)),
        h('td', null, h('span', {class: `pill pill-${tone}`, title: call.end_reason || ''}, label)),
        h('td', {class: 'num'}, usd(call.cost_usd)),
        h('td', null, call.recording ? h('span', {class: 'has-recording'}, icon('play'), 'Recording') : h('span', {class: 'muted'}, '–')));
      body.append(row);
    }
    cursor = page.next;
    if (!body.children.length) {
      list.replaceChildren(stateBox('empty', filtered ? 'No calls match these filters' : 'No calls yet',
        filtered ? 'Try a wider date range, or another number or ending.' : 'Finished calls appear here.'));
    } else {
      list.replaceChildren(table, cursor ? h('div', {class: 'more'}, more) : null);
      more.disabled = false;
    }
    mark('history.rows', {n: body.children.length});
  }
  await load();
  return () => stops.forEach((stop) => stop());
}
