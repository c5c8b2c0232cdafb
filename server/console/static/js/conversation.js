// A call's conversation on the page, from live events (apply) or from a record's timeline
// (addEntry): caller, assistant and operator turns, tools, keypad, barge-ins, notes.
import {h} from './dom.js';
import {duration, ms, pretty} from './format.js';
import {icon} from './icons.js';
import {mark} from './probe.js';

// A cut turn: the caller heard `heard_ms` of it; speech runs at about this many characters a
// second, so the words past that point are shown as not heard (an estimate, and said so).
const CHARS_PER_SECOND = 15;

const ROLE_NAMES = {caller: 'Caller', assistant: 'Assistant', operator: 'Operator'};

function heardSplit(text, heardMs) {
  if (heardMs === null || heardMs === undefined) return [text, ''];
  let cut = Math.round((heardMs / 1000) * CHARS_PER_SECOND);
  if (cut >= text.length) return [text, ''];
  const space = text.indexOf(' ', cut);
  cut = space < 0 ? text.length : space;
  return [text.slice(0, cut), text.slice(cut)];
}

function jsonBlock(label, value) {
  let compact;
  try {
    compact = typeof value === 'string' ? value : JSON.stringify(value);
  } catch {
    compact = String(value);
  }
  if (compact.length < 100 && !compact.includes('\n')) {
    return h('div', {class: 'kv'}, h('span', {class: 'kv-key'}, label), h('code', null, compact));
  }
  return h('details', {class: 'kv-details'}, h('summary', null, label), h('pre', null, pretty(value)));
}

export class Conversation {
  constructor({onSeek = null, onChange = () => {}, showDigits = false} = {}) {
    this.showDigits = showDigits; // LOG_PII=true: the server shows digits, so may the page
    this.el = h('ol', {class: 'convo', 'aria-label': 'Conversation'});
    this.lines = new Map(); // item_id -> turn
    this.tools = new Map(); // call_id -> tool card
    this.pendingLatency = new Map();
    this.pendingCut = new Map();
    this.onSeek = onSeek;
    this.onChange = onChange;
    this.count = 0;
  }

  isEmpty() {
    return this.count === 0;
  }

  add(li, at) {
    if (at !== undefined && at !== null) {
      li.dataset.at = at;
      if (this.onSeek) {
        li.classList.add('seekable');
        li.tabIndex = 0;
        li.title = 'Play the recording from here';
        const seek = () => this.onSeek(Number(at), li);
        li.addEventListener('click', (e) => {
          if (!e.target.closest('details, a, button')) seek();
        });
        li.addEventListener('keydown', (e) => {
          if (e.key === 'Enter') seek();
        });
      }
    }
    this.el.append(li);
    this.count += 1;
    this.onChange(li);
    return li;
  }

  timeLabel(at) {
    return at === undefined || at === null ? null : h('span', {class: 'at'}, duration(at));
  }

  turn(role, itemId, at, operator) {
    const textEl = h('p', {class: 'turn-text'});
    const meta = h('div', {class: 'turn-meta'},
      h('span', {class: 'role'}, role === 'operator' && operator ? `Operator · ${operator}` : ROLE_NAMES[role] || role),
      this.timeLabel(at));
    const li = h('li', {class: `turn turn-${role} turn-pending`, dataset: {item: itemId || ''}}, meta, textEl);
    const line = {li, meta, textEl, role, text: '', final: false, heardMs: null, interrupted: false};
    if (itemId) this.lines.set(itemId, line);
    this.add(li, at);
    const latency = itemId && this.pendingLatency.get(itemId);
    if (latency !== undefined && latency !== null) this.setLatency(line, latency);
    if (itemId && this.pendingCut.has(itemId)) this.setCut(line, this.pendingCut.get(itemId));
    return line;
  }

  render(line) {
    const [heard, unheard] = line.interrupted ? heardSplit(line.text, line.heardMs) : [line.text, ''];
    line.textEl.replaceChildren(heard, unheard ? h('span', {class: 'unheard', title: 'Not heard by the caller (estimated)'}, unheard) : '');
    line.li.classList.toggle('turn-pending', !line.final);
  }

  setLatency(line, value) {
    let badge = line.meta.querySelector('.latency');
    if (!badge) {
      badge = h('span', {class: 'badge latency', title: 'Caller stopped speaking → first reply audio'});
      line.meta.append(badge);
    }
    badge.replaceChildren(icon('clock'), ms(value));
    badge.classList.toggle('latency-slow', value >= 1500);
  }

  setCut(line, heardMs) {
    line.interrupted = true;
    line.heardMs = heardMs;
    line.li.classList.add('turn-cut');
    let note = line.li.querySelector('.turn-note');
    if (!note) {
      note = h('div', {class: 'turn-note'});
      line.li.append(note);
    }
    note.replaceChildren(icon('cut'), heardMs === null || heardMs === undefined
      ? 'Interrupted by the caller'
      : `Interrupted · the caller heard ${ms(heardMs)}`);
    this.render(line);
  }

  note(kind, iconName, content, at, extra) {
    const li = h('li', {class: `event event-${kind}`}, icon(iconName),
      h('div', {class: 'event-body'}, content, extra), this.timeLabel(at));
    return this.add(li, at);
  }

  // --- live events (design-core.md's vocabulary) ---

  apply(event) {
    const at = event.at;
    switch (event.type) {
      case 'transcript': {
        let line = this.lines.get(event.item_id);
        if (!line) line = this.turn(event.role, event.item_id, at, event.operator);
        if (event.final) {
          line.text = event.text || '';
          line.final = true;
          if (event.interrupted) {
            this.setCut(line, event.heard_ms ?? line.heardMs);
          }
        } else if (!line.final) {
          line.text += event.text || '';
        }
        this.render(line);
        break;
      }
      case 'barge_in': {
        const line = this.lines.get(event.item_id);
        if (line) this.setCut(line, event.heard_ms);
        else this.pendingCut.set(event.item_id, event.heard_ms);
        this.note('barge', 'cut', 'The caller interrupted', at);
        break;
      }
      case 'latency': {
        if (typeof event.ms !== 'number') break; // a reply that answered no new caller turn
        const line = this.lines.get(event.item_id);
        if (line) this.setLatency(line, event.ms);
        else this.pendingLatency.set(event.item_id, event.ms);
        break;
      }
      case 'tool.started':
        this.toolStarted(event.call_id, event.name, event.arguments, at);
        break;
      case 'tool.finished':
        this.toolFinished(event);
        break;
      case 'keypad':
        this.note('keypad', 'keypad', h('span', null, 'Keypad ', h('code', {class: 'digits'},
          this.showDigits ? event.digits || '' : (event.digits || '').replace(/./gu, '•'))), at);
        break;
      case 'whisper':
        this.note('whisper', 'message', h('span', null, h('b', null, event.operator || 'An operator'),
          ' whispered', event.respond ? ' (say it now)' : '', ': ', h('q', null, event.text || '')), at);
        break;
      case 'takeover':
        this.note('takeover', 'mic', h('span', null, h('b', null, event.operator || 'An operator'), ' took over the call'), at);
        break;
      case 'handback':
        this.note('handback', 'handoff', h('span', null, h('b', null, event.operator || 'An operator'), ' handed the call back to the assistant'), at);
        break;
      case 'session.replaced':
        this.note('system', 'warn', `Model session replaced (${event.reason || 'lost'}), ${ms(event.gap_ms)} without a model`, at);
        break;
      case 'operator.action':
        if (!['takeover', 'handback', 'whisper'].includes(event.action)) {
          this.note('action', 'note', h('span', null, h('b', null, event.operator || 'An operator'), ` ${event.action}`,
            event.detail ? ` · ${typeof event.detail === 'string' ? event.detail : pretty(event.detail)}` : ''), at);
        }
        break;
      case 'dropped':
        this.note('system', 'warn', `${event.count} events were skipped (the page fell behind)`, at);
        break;
      case 'call.ended':
        if (event.kind === 'handover') {
          this.note('system', 'handoff', 'Handed over to another instance of the bridge (a deploy); the call goes on there', at);
        } else {
          this.note('ended', 'end', `Call ended${event.reason ? `: ${event.reason}` : ''}`, at);
        }
        break;
      default:
        return false;
    }
    mark('event', {seq: event.seq, type: event.type});
    return true;
  }

  toolStarted(callId, name, args, at) {
    const status = h('span', {class: 'tool-status tool-running'}, h('span', {class: 'spinner spinner-small'}), 'running');
    const body = h('div', {class: 'tool-body'}, jsonBlock('Arguments', args ?? {}));
    const li = this.note('tool', 'tool', h('span', {class: 'tool-head'}, h('b', null, name || 'tool'), status), at, body);
    const card = {li, status, body, started: performance.now()};
    if (callId) this.tools.set(callId, card);
    return card;
  }

  toolFinished(event) {
    let card = this.tools.get(event.call_id);
    if (!card) card = this.toolStarted(event.call_id, event.name, event.arguments, event.at);
    const ok = event.outcome === 'ok';
    card.status.className = `tool-status ${ok ? 'tool-ok' : 'tool-failed'}`;
    card.status.replaceChildren(`${ok ? 'done' : (event.outcome || 'failed').replace(/_/g, ' ')}`,
      event.seconds !== undefined && event.seconds !== null ? ` · ${ms(event.seconds * 1000)}` : '');
    card.body.append(ok ? jsonBlock('Result', event.result ?? null) : jsonBlock('Error', event.error ?? event.result ?? null));
    card.li.classList.add(ok ? 'event-tool-ok' : 'event-tool-failed');
  }

  // --- a record's timeline (server/call/conversation.py: Conversation.to_dicts) ---

  addEntry(entry) {
    const at = entry.at;
    const kind = entry.kind || entry.type;
    if (kind === 'caller' || kind === 'assistant' || kind === 'operator') {
      const line = this.turn(kind, entry.item_id, at, entry.operator);
      line.text = entry.text || '';
      line.final = true;
      if (entry.latency_ms !== undefined && entry.latency_ms !== null) this.setLatency(line, entry.latency_ms);
      if (entry.interrupted) this.setCut(line, entry.heard_ms);
      this.render(line);
    } else if (kind === 'tool') {
      this.toolFinished({...entry, at});
    } else if (kind === 'keypad') {
      this.apply({type: 'keypad', digits: entry.digits, at});
    } else if (kind === 'whisper' || kind === 'takeover' || kind === 'handback') {
      this.apply({...entry, type: kind, at});
    } else if (kind === 'error') {
      this.note('error', 'warn', `Model error${entry.code ? ` (${entry.code})` : ''}: ${entry.message || ''}`, at);
    } else {
      this.note('system', 'note', entry.text || entry.message || kind || 'note', at);
    }
  }
}
