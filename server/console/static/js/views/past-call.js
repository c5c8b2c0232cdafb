// A finished call from its record (GET /calls/{sid}): the recording with a timeline strip,
// the conversation (a click on a line plays the recording from there), usage and cost,
// latency, and what operators did.
import {api} from '../api.js';
import {Conversation} from '../conversation.js';
import {h, stateBox, svg} from '../dom.js';
import {dateTime, duration, ending, median, ms, plural, pretty, usd} from '../format.js';
import {icon} from '../icons.js';
import {mark} from '../probe.js';

const LEAD_S = 0.25; // start a little before the line, so its first word is not clipped

function percentile(values, q) {
  const sorted = values.filter((v) => isFinite(v)).sort((a, b) => a - b);
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

function tokenRows(usage) {
  const rows = [];
  const walk = (prefix, obj) => {
    for (const [key, value] of Object.entries(obj || {})) {
      const short = key.replace(/_token_details$/, '').replace(/_?tokens$/, '') || key;
      const name = prefix ? `${prefix} · ${short}` : short;
      if (typeof value === 'number') rows.push([name.replace(/_/g, ' '), value]);
      else if (value && typeof value === 'object') walk(name, value);
    }
  };
  walk('', usage);
  return rows;
}

function strip(record, total, seek) {
  const width = 1000;
  const height = 34;
  const root = svg('svg', {viewBox: `0 0 ${width} ${height}`, class: 'strip', preserveAspectRatio: 'none',
    role: 'img', 'aria-label': 'When each side spoke'});
  const entries = record.timeline || [];
  const x = (at) => (Math.max(0, Math.min(total, at)) / total) * width;
  entries.forEach((entry, i) => {
    const kind = entry.kind || entry.type;
    if (kind === 'caller' || kind === 'assistant' || kind === 'operator') {
      const next = entries.slice(i + 1).find((e) => typeof e.at === 'number');
      const end = next ? next.at : Math.min(total, entry.at + 3);
      const lane = kind === 'caller' ? 4 : 18;
      root.append(svg('rect', {x: x(entry.at), y: lane, width: Math.max(2, x(end) - x(entry.at) - 1), height: 12, rx: 2,
        class: `strip-${kind}${entry.interrupted ? ' strip-cut' : ''}`}, svg('title', null, `${duration(entry.at)} ${kind}`)));
    } else if (typeof entry.at === 'number') {
      root.append(svg('rect', {x: x(entry.at) - 1, y: 0, width: 2, height, class: `strip-mark strip-${kind}`},
        svg('title', null, `${duration(entry.at)} ${kind}`)));
    }
  });
  const head = svg('line', {x1: 0, x2: 0, y1: 0, y2: height, class: 'strip-head'});
  root.append(head);
  root.addEventListener('click', (event) => {
    const box = root.getBoundingClientRect();
    seek(((event.clientX - box.left) / box.width) * total);
  });
  return {root, move: (t) => { const p = x(t); head.setAttribute('x1', p); head.setAttribute('x2', p); }};
}

export async function pastCallView(root, {params, alive, config}) {
  const [sid] = params;
  root.append(stateBox('loading', 'Loading the call…'));
  let record;
  try {
    record = await api(`/calls/${encodeURIComponent(sid)}`);
  } catch (error) {
    if (!alive()) return null;
    root.replaceChildren(
      h('a', {href: '/console/history', class: 'back'}, icon('back'), 'History'),
      error.status === 404 ? stateBox('empty', 'There is no record of this call', 'It may be older than the retention period, or still in progress.')
        : stateBox('error', 'The call cannot be loaded', error.message));
    return null;
  }
  if (!alive()) return null;
  const [label, tone] = ending(record.end_kind);
  const total = Math.max(1, record.duration_seconds || 0);

  let audio = null;
  let bar = null;
  const convo = new Conversation({onSeek: record.recording ? (at) => seek(at - LEAD_S) : null,
    showDigits: config.log_pii});
  (record.timeline || []).forEach((entry) => convo.addEntry(entry));
  function seek(t) {
    if (!audio) return;
    audio.currentTime = Math.max(0, t);
    audio.play().catch(() => {});
    mark('seek', {to: audio.currentTime});
  }

  let player;
  if (record.recording) {
    audio = h('audio', {controls: true, preload: 'metadata', src: `/calls/${encodeURIComponent(sid)}/recording.wav`});
    bar = strip(record, total, seek);
    let current = null;
    audio.addEventListener('timeupdate', () => {
      bar.move(audio.currentTime);
      let found = null;
      for (const li of convo.el.children) {
        if (Number(li.dataset.at) <= audio.currentTime + 0.05) found = li; else break;
      }
      if (found !== current) {
        if (current) current.classList.remove('current');
        if (found) found.classList.add('current');
        current = found;
      }
    });
    audio.addEventListener('error', () => player.append(h('p', {class: 'muted'},
      'The recording cannot be played here (it may be kept by another instance).')));
    player = h('section', {class: 'card player'}, h('header', {class: 'card-head'}, h('h2', null, 'Recording'),
      h('span', {class: 'figure'}, 'Click a line of the conversation to play it')), audio, bar.root,
    h('div', {class: 'strip-legend'}, h('span', {class: 'key key-caller'}, 'Caller'), h('span', {class: 'key key-assistant'}, 'Assistant'),
      h('span', {class: 'key key-operator'}, 'Operator'), h('span', {class: 'key key-mark'}, 'Tool / keypad')));
  } else {
    player = h('section', {class: 'card player player-none'}, icon('record'),
      h('span', {class: 'muted'}, 'No recording of this call (RECORD_CALLS was off, or it is kept elsewhere).'));
  }

  const latencies = record.latencies_ms || [];
  const usageRows = tokenRows(record.usage);
  const actions = record.operator_actions || [];
  const details = [
    ['Call SID', h('code', null, record.call_sid)],
    ['From', record.from || '–'], ['To', record.to || '–'],
    ['Model', record.model || '–'], ['Prompt', record.prompt || '–'],
    ['Ended', record.end_reason || label],
    ['Barge-ins', String(record.barge_ins ?? 0)],
    ['Model sessions', String((record.sessions || []).length || 1)],
  ];
  root.replaceChildren(
    h('div', {class: 'call-head'},
      h('a', {href: '/console/history', class: 'back'}, icon('back'), 'History'),
      h('div', {class: 'call-title-row'},
        h('h1', {class: 'call-title'}, record.from || 'Unknown caller'),
        h('div', {class: 'chips'},
          h('span', {class: 'chip'}, icon(record.direction === 'outbound' ? 'outbound' : 'inbound'), record.direction === 'outbound' ? 'Outbound' : 'Inbound'),
          h('span', {class: `pill pill-${tone}`, title: record.end_reason || ''}, label),
          h('span', {class: 'chip chip-quiet'}, dateTime(record.started_at))),
        h('span', {class: 'spacer'}),
        h('span', {class: 'timer'}, duration(record.duration_seconds)))),
    player,
    h('div', {class: 'call-layout'},
      h('section', {class: 'card convo-card'},
        h('header', {class: 'card-head'}, h('h2', null, 'Conversation'), h('span', {class: 'figure'}, plural(convo.lines.size, 'turn'))),
        h('div', {class: 'convo-scroll convo-static'}, convo.isEmpty()
          ? stateBox('empty', 'Nothing was said', 'The record has no transcript (TRANSCRIPTION_MODEL may be off).') : convo.el)),
      h('aside', {class: 'controls'},
        h('section', {class: 'card'}, h('h2', null, 'Latency'),
          h('dl', {class: 'figures'},
            h('div', null, h('dt', null, 'Median'), h('dd', null, ms(median(latencies)))),
            h('div', null, h('dt', null, 'p90'), h('dd', null, ms(percentile(latencies, 0.9)))),
            h('div', null, h('dt', null, 'Slowest'), h('dd', null, ms(latencies.length ? Math.max(...latencies) : null))),
            h('div', null, h('dt', null, 'Replies'), h('dd', null, String(latencies.length))))),
        h('section', {class: 'card'}, h('h2', null, 'Usage and cost'),
          h('p', {class: 'cost'}, usd(record.cost_usd), h('span', {class: 'muted'}, ' estimated')),
          usageRows.length ? h('table', {class: 'kv-table'}, h('tbody', null,
            usageRows.map(([k, v]) => h('tr', null, h('th', null, k), h('td', {class: 'num'}, v.toLocaleString())))))
            : h('p', {class: 'muted'}, 'No usage was reported.')),
        h('section', {class: 'card'}, h('h2', null, 'Operator actions'),
          actions.length ? h('ol', {class: 'actions'}, actions.map((a) => h('li', null,
            h('span', {class: 'at'}, a.at !== undefined ? duration(a.at) : dateTime(a.time)),
            h('b', null, a.operator), ` ${a.action}`, a.detail ? h('span', {class: 'muted'}, ` · ${typeof a.detail === 'string' ? a.detail : pretty(a.detail)}`) : null)))
            : h('p', {class: 'muted'}, 'Nobody listened in or stepped in.')),
        h('section', {class: 'card'}, h('h2', null, 'Details'),
          h('dl', {class: 'details'}, details.map(([k, v]) => h('div', null, h('dt', null, k), h('dd', null, v))))))));
  mark('past.loaded', {sid});
  return () => {
    if (audio) audio.pause();
  };
}
