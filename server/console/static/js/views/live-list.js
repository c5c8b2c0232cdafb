// The live calls, fleet-wide: GET /calls?status=live once (and every few seconds, for each
// call's speaker, latency and tools), GET /events (SSE) for calls starting and ending at once.
import {api} from '../api.js';
import {h, stateBox} from '../dom.js';
import {duration, maskNumber, ms, since} from '../format.js';
import {icon} from '../icons.js';
import {mark} from '../probe.js';
import {EventStream} from '../sse.js';

const POLL_MS = 2000;
const LEAVE_MS = 300; // the row fades, then goes
const HANDOVER_GRACE_MS = 5000; // a handed-over call ends here and starts on another instance

function normalise(summary) {
  return {
    call_sid: summary.call_sid,
    from: summary.from ?? summary.caller ?? '',
    to: summary.to ?? summary.called ?? '',
    direction: summary.direction || 'inbound',
    started_at: summary.started_at,
    speaker: summary.speaker ?? null,
    latency_ms: summary.latency_ms ?? null,
    tools_running: summary.tools_running ?? 0,
    taken_over_by: summary.taken_over_by ?? null,
  };
}

export function speakerPill(speaker) {
  if (!speaker) return h('span', {class: 'speaking speaking-none'}, 'Silence');
  const name = {caller: 'Caller', assistant: 'Assistant', operator: 'Operator'}[speaker] || speaker;
  return h('span', {class: `speaking speaking-${speaker}`}, h('span', {class: 'wave'}, h('i'), h('i'), h('i')), name);
}

export async function liveListView(root, {navigate}) {
  const calls = new Map(); // call_sid -> {data, row, cells, missing, added}
  const ended = new Set();
  let loaded = false;
  let failure = null;
  let queued = [];

  const count = h('span', {class: 'count-pill'}, '0');
  const connection = h('span', {class: 'conn conn-connecting'}, 'Connecting…');
  const body = h('tbody');
  const table = h('table', {class: 'calls-table live-table'},
    h('thead', null, h('tr', null,
      h('th', null, 'Caller'), h('th', null, 'Direction'), h('th', {class: 'num'}, 'Duration'),
      h('th', null, 'Speaking'), h('th', {class: 'num'}, 'Latest latency'), h('th', null, 'Tools'),
      h('th', null, ''))),
    body);
  const content = h('div', {class: 'card table-card'});
  root.append(
    h('div', {class: 'page-head'},
      h('div', null, h('h1', null, 'Live calls ', count),
        h('p', {class: 'muted'}, 'Every call in progress across the fleet. Open one to follow it, listen in or step in.')),
      connection),
    content);

  function showState() {
    count.textContent = String(calls.size);
    if (!loaded && !failure) {
      content.replaceChildren(stateBox('loading', 'Loading live calls…'));
    } else if (failure && !calls.size) {
      content.replaceChildren(stateBox('error', 'The live calls cannot be loaded', `${failure}. Trying again…`));
    } else if (!calls.size) {
      content.replaceChildren(stateBox('empty', 'No calls right now',
        'Calls appear here the moment they start, and leave when they end.'));
    } else if (content.firstChild !== table) {
      content.replaceChildren(table);
    }
  }

  function cellsFor(entry) {
    const {data, cells} = entry;
    cells.caller.replaceChildren(
      h('a', {href: `/console/calls/${encodeURIComponent(data.call_sid)}`, class: 'number'}, maskNumber(data.from)),
      h('span', {class: 'sub'}, data.to ? `to ${maskNumber(data.to)}` : ''));
    cells.direction.replaceChildren(icon(data.direction === 'outbound' ? 'outbound' : 'inbound'),
      data.direction === 'outbound' ? 'Outbound' : 'Inbound');
    cells.speaker.replaceChildren(speakerPill(data.speaker));
    cells.latency.textContent = ms(data.latency_ms);
    cells.latency.classList.toggle('slow', data.latency_ms >= 1500);
    cells.tools.replaceChildren(data.tools_running
      ? h('span', {class: 'tools-running'}, h('span', {class: 'spinner spinner-small'}), `${data.tools_running} running`)
      : h('span', {class: 'muted'}, '–'));
    cells.status.replaceChildren(data.taken_over_by
      ? h('span', {class: 'pill pill-operator'}, icon('mic'), `Taken over · ${data.taken_over_by}`) : '');
    cells.duration.textContent = duration(since(data.started_at));
  }

  function upsert(summary, fromEvent) {
    const data = normalise(summary);
    if (!data.call_sid) return;
    let entry = calls.get(data.call_sid);
    if (entry) {
      clearTimeout(entry.leaving);
      entry.row.classList.remove('row-leaving');
      // A poll answer carries the live fields; an event may not: keep what we know.
      for (const key of Object.keys(data)) {
        if (data[key] !== null && data[key] !== undefined && data[key] !== '') entry.data[key] = data[key];
      }
      if (!fromEvent) {
        entry.data.speaker = data.speaker;
        entry.data.taken_over_by = data.taken_over_by;
        entry.data.latency_ms = data.latency_ms ?? entry.data.latency_ms;
      }
      entry.missing = 0;
    } else {
      const cells = {caller: h('td', {class: 'caller'}), direction: h('td', {class: 'direction'}),
        duration: h('td', {class: 'num duration'}), speaker: h('td'), latency: h('td', {class: 'num'}),
        tools: h('td'), status: h('td', {class: 'status'})};
      const row = h('tr', {class: 'row-new', dataset: {sid: data.call_sid}},
        cells.caller, cells.direction, cells.duration, cells.speaker, cells.latency, cells.tools, cells.status);
      row.addEventListener('click', (e) => {
        if (!e.target.closest('a')) navigate(`/console/calls/${encodeURIComponent(data.call_sid)}`);
      });
      entry = {data, row, cells, missing: 0, added: Date.now()};
      calls.set(data.call_sid, entry);
      // newest first
      body.prepend(row);
      setTimeout(() => row.classList.remove('row-new'), 1500);
      mark('live.row', {sid: data.call_sid});
    }
    cellsFor(entry);
    showState();
  }

  function remove(sid, delay = LEAVE_MS) {
    const entry = calls.get(sid);
    if (!entry) return;
    entry.row.classList.add('row-leaving');
    clearTimeout(entry.leaving);
    entry.leaving = setTimeout(() => {
      entry.row.remove();
      calls.delete(sid);
      mark('live.gone', {sid});
      showState();
    }, delay);
  }

  function onEvent(event) {
    if (!loaded) {
      queued.push(event);
      return;
    }
    apply(event);
  }

  function apply(event) {
    mark('fleet.event', {type: event.type, sid: event.call_sid});
    if (event.type === 'call.started') {
      ended.delete(event.call_sid);
      upsert(event, true);
    } else if (event.type === 'call.ended') {
      if (event.kind === 'handover') {
        remove(event.call_sid, HANDOVER_GRACE_MS); // back at once if another instance takes it
      } else {
        ended.add(event.call_sid);
        remove(event.call_sid);
      }
    } else if (event.type === 'call.status' && calls.has(event.call_sid)) {
      upsert(event, false);
    }
  }

  async function refresh() {
    try {
      const answer = await api('/calls?status=live');
      const seen = new Set();
      for (const summary of answer.calls || []) {
        if (ended.has(summary.call_sid)) continue;
        seen.add(summary.call_sid);
        upsert(summary, false);
      }
      // Gone without an event (missed while reconnecting): twice absent, and not brand new.
      for (const [sid, entry] of calls) {
        if (!seen.has(sid) && Date.now() - entry.added > POLL_MS && ++entry.missing >= 2) remove(sid);
      }
      failure = null;
    } catch (error) {
      failure = error.message;
    }
    if (!loaded) {
      loaded = true;
      const pending = queued;
      queued = [];
      pending.forEach(apply);
    }
    showState();
  }

  showState();
  refresh();
  const stream = new EventStream('/events', {
    onEvent,
    onOpen: refresh, // (re)connected: catch up with what happened meanwhile
    onState: (state) => {
      connection.className = `conn conn-${state}`;
      connection.textContent = {live: 'Live', reconnecting: 'Reconnecting…', connecting: 'Connecting…', closed: 'Offline'}[state] || state;
    },
    onGone: () => {
      failure = failure || 'The live events are not available on this server';
      connection.className = 'conn conn-closed';
      connection.textContent = 'Offline';
      showState();
    },
  }).start();
  const poll = setInterval(refresh, POLL_MS);
  const tick = setInterval(() => {
    for (const entry of calls.values()) entry.cells.duration.textContent = duration(since(entry.data.started_at));
  }, 1000);
  return () => {
    stream.close();
    clearInterval(poll);
    clearInterval(tick);
  };
}
