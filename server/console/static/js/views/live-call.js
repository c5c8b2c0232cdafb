// One live call: its conversation as it happens (GET /calls/{sid}/events, SSE, replayed from
// the start), and the operator's controls: listen, whisper, take over / hand back, transfer,
// hang up.
import {ApiError, api} from '../api.js';
import {Listener} from '../audio/listen.js';
import {Talker} from '../audio/talk.js';
import {Conversation} from '../conversation.js';
import {confirmDialog, h, stateBox, toast} from '../dom.js';
import {duration, maskNumber, median, ms, plural, since} from '../format.js';
import {icon} from '../icons.js';
import {mark} from '../probe.js';
import {EventStream} from '../sse.js';
import {speakerPill} from './live-list.js';

const SPEAKING_MS = 1500; // a speaker counts as speaking this long after their last words
const HANDOVER_GAP_MS = 15000; // a handed-over call's new stream comes within this

function meter(label, cls) {
  const fill = h('span', {class: 'meter-fill'});
  const el = h('div', {class: `meter ${cls}`}, h('span', {class: 'meter-label'}, label), h('span', {class: 'meter-track'}, fill));
  return {el, set: (level) => fill.style.setProperty('--level', String(Math.min(1, level * 1.6)))};
}

export async function liveCallView(root, {params, config}) {
  const [sid] = params;
  const path = `/calls/${encodeURIComponent(sid)}`;
  const me = config.operator;
  const state = {info: null, ended: null, takenOverBy: null, speaker: null, spokeAt: 0,
    toolsRunning: new Set(), latencies: [], bargeIns: 0, turns: new Set(), lastSeq: 0, events: 0,
    handingOver: false};
  let listener = null;
  let talker = null;

  // --- layout ---
  const title = h('h1', {class: 'call-title'}, 'Live call');
  const chips = h('div', {class: 'chips'});
  const timer = h('span', {class: 'timer'}, '0:00');
  const banner = h('div', {class: 'banner', hidden: true});
  const conn = h('span', {class: 'conn conn-connecting'}, 'Connecting…');
  const scroller = h('div', {class: 'convo-scroll'});
  const jump = h('button', {class: 'btn btn-small jump', hidden: true, onclick: () => scrollToEnd(true)}, 'New messages ↓');
  const waiting = stateBox('loading', 'Waiting for the call’s events…');
  const convo = new Conversation({onChange: () => afterGrow(), showDigits: config.log_pii});
  scroller.append(waiting, convo.el);

  const listenButton = h('button', {class: 'btn btn-primary btn-wide', onclick: () => toggleListen()}, icon('headphones'), 'Listen');
  const listenStatus = h('p', {class: 'control-status muted'}, 'Both sides, mixed, as the caller hears them.');
  const callerMeter = meter('Caller', 'meter-caller');
  const assistantMeter = meter('Assistant', 'meter-assistant');

  const whisperText = h('textarea', {rows: 2, maxlength: 2000, placeholder: 'e.g. Offer the 10 % discount',
    'aria-label': 'Whisper to the assistant'});
  const respond = h('input', {type: 'checkbox', id: 'whisper-respond'});
  const whisperButton = h('button', {class: 'btn', type: 'submit'}, icon('message'), 'Whisper');
  const whisperForm = h('form', {class: 'whisper', onsubmit: (e) => { e.preventDefault(); sendWhisper(); }},
    whisperText,
    h('div', {class: 'row-between'},
      h('label', {class: 'check', for: 'whisper-respond'}, respond, 'Say it now'),
      whisperButton));

  const takeButton = h('button', {class: 'btn btn-warn btn-wide', onclick: () => toggleTakeOver()}, icon('mic'), 'Take over');
  const takeStatus = h('p', {class: 'control-status muted'}, 'Talk to the caller yourself; the assistant keeps listening.');
  const micMeter = meter('You', 'meter-operator');
  micMeter.el.hidden = true;

  const targets = config.transfer_targets || [];
  const targetSelect = h('select', {'aria-label': 'Transfer to'}, targets.map((t) => h('option', {value: t}, t)));
  const transferButton = h('button', {class: 'btn', onclick: () => transfer()}, icon('handoff'), 'Transfer');
  const hangButton = h('button', {class: 'btn btn-danger btn-wide', onclick: () => hangUp()}, icon('end'), 'Hang up');

  const facts = h('span', {class: 'figure facts'});
  const speaking = h('div', {class: 'speaking-now'});

  root.append(
    h('div', {class: 'call-head'},
      h('a', {href: '/console', class: 'back'}, icon('back'), 'Live calls'),
      h('div', {class: 'call-title-row'}, title, chips, h('span', {class: 'spacer'}), speaking, timer)),
    banner,
    h('div', {class: 'call-layout'},
      h('section', {class: 'card convo-card'},
        h('header', {class: 'card-head'}, h('h2', null, 'Conversation'), h('span', {class: 'head-right'}, facts, conn)),
        scroller, jump),
      h('aside', {class: 'controls'},
        h('section', {class: 'card control'}, h('h2', null, 'Listen in'), listenButton, callerMeter.el, assistantMeter.el, listenStatus),
        h('section', {class: 'card control'}, h('h2', null, 'Whisper to the assistant'),
          h('p', {class: 'control-status muted hint'}, 'The caller never hears it. “Say it now”: the assistant acts on it after its current reply.'),
          whisperForm),
        h('section', {class: 'card control'}, h('h2', null, 'Take over'), takeButton, micMeter.el, takeStatus),
        h('section', {class: 'card control'}, h('h2', null, 'Call'),
          targets.length ? h('div', {class: 'transfer'}, targetSelect, transferButton)
            : h('p', {class: 'control-status muted'}, 'No transfer targets are set (TRANSFER_TARGETS).'),
          hangButton))));

  // --- rendering state ---
  function nearEnd() {
    return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80;
  }
  let stick = true;
  scroller.addEventListener('scroll', () => {
    stick = nearEnd();
    if (stick) jump.hidden = true;
  });
  function scrollToEnd(force) {
    if (force || stick) {
      scroller.scrollTop = scroller.scrollHeight;
      jump.hidden = true;
      stick = true;
    }
  }
  function afterGrow() {
    waiting.remove();
    if (stick) scrollToEnd(); else jump.hidden = false;
  }

  function renderHead() {
    const info = state.info || {};
    title.textContent = maskNumber(info.caller || info.from || '');
    chips.replaceChildren(
      h('span', {class: 'chip'}, icon(info.direction === 'outbound' ? 'outbound' : 'inbound'), info.direction === 'outbound' ? 'Outbound' : 'Inbound'),
      state.ended ? h('span', {class: 'pill pill-ended'}, 'Ended')
        : state.takenOverBy ? h('span', {class: 'pill pill-operator'}, icon('mic'), `Taken over · ${state.takenOverBy}`)
          : h('span', {class: 'pill pill-live'}, h('span', {class: 'dot'}), 'Live'),
      info.model ? h('span', {class: 'chip chip-quiet'}, info.model) : null,
      info.prompt ? h('span', {class: 'chip chip-quiet'}, info.prompt) : null);
  }

  function renderControls() {
    const live = !state.ended;
    const mine = state.takenOverBy === me;
    const other = state.takenOverBy && !mine;
    whisperButton.disabled = !live;
    whisperText.disabled = !live;
    transferButton.disabled = !live || Boolean(talker);
    targetSelect.disabled = !live;
    hangButton.disabled = !live;
    listenButton.disabled = !live && !listener;
    takeButton.disabled = !live || Boolean(other);
    if (talker) {
      takeButton.replaceChildren(icon('handoff'), 'Hand back');
      takeButton.className = 'btn btn-primary btn-wide';
    } else {
      takeButton.replaceChildren(icon('mic'), other ? `${state.takenOverBy} has the call` : 'Take over');
      takeButton.className = 'btn btn-warn btn-wide';
    }
    const bits = [plural(state.turns.size, 'turn')];
    if (state.latencies.length) bits.push(`median ${ms(median(state.latencies))}`);
    if (state.bargeIns) bits.push(plural(state.bargeIns, 'barge-in'));
    if (state.toolsRunning.size) bits.push(`${plural(state.toolsRunning.size, 'tool')} running`);
    facts.textContent = bits.join(' · ');
  }

  function renderSpeaking() {
    const current = Date.now() - state.spokeAt < SPEAKING_MS ? state.speaker : null;
    speaking.replaceChildren(state.ended ? '' : speakerPill(current));
  }

  function end(event) {
    state.ended = event || {};
    banner.hidden = false;
    banner.className = 'banner banner-ended';
    banner.replaceChildren(icon('end'), 'This call has ended.',
      h('a', {href: `/console/history/${encodeURIComponent(sid)}`}, 'See it in the history →'));
    if (talker) {
      talker.stop();
      talker = null;
      micMeter.el.hidden = true;
    }
    renderHead();
    renderControls();
    renderSpeaking();
  }

  function onEvent(event) {
    if (typeof event.seq === 'number') {
      if (event.seq <= state.lastSeq) return; // replayed after a reconnect: already shown
      state.lastSeq = event.seq;
    }
    state.events += 1;
    switch (event.type) {
      case 'call.started':
        state.info = event;
        if (state.handingOver) { // the call goes on, on another instance
          state.handingOver = false;
          banner.hidden = true;
          if (listener) listener.reconnect();
        }
        renderHead();
        mark('event', {seq: event.seq, type: event.type});
        break;
      case 'call.ended':
        convo.apply(event);
        if (event.kind === 'handover') {
          state.handingOver = true;
          stream.expectGap(HANDOVER_GAP_MS);
          banner.hidden = false;
          banner.className = 'banner banner-moving';
          banner.replaceChildren(icon('handoff'), 'The call is moving to another instance of the bridge…');
          break;
        }
        end(event);
        setTimeout(() => stream.close(), 0); // nothing follows the end
        break;
      case 'transcript':
        if (!event.final || event.role !== 'caller') {
          state.speaker = event.role;
          state.spokeAt = Date.now();
        }
        state.turns.add(event.item_id);
        convo.apply(event);
        break;
      case 'latency':
        if (typeof event.ms === 'number') state.latencies.push(event.ms); // null: not a turn's first reply
        convo.apply(event);
        break;
      case 'barge_in':
        state.bargeIns += 1;
        convo.apply(event);
        break;
      case 'tool.started':
        state.toolsRunning.add(event.call_id);
        convo.apply(event);
        break;
      case 'tool.finished':
        state.toolsRunning.delete(event.call_id);
        convo.apply(event);
        break;
      case 'takeover':
        state.takenOverBy = event.operator;
        convo.apply(event);
        renderHead();
        break;
      case 'handback':
        state.takenOverBy = null;
        convo.apply(event);
        renderHead();
        break;
      default:
        convo.apply(event);
    }
    renderControls();
    renderSpeaking();
  }

  // --- actions ---
  async function post(suffix, body, done) {
    try {
      await api(`${path}/${suffix}`, {method: 'POST', body});
      if (done) toast(done, 'ok');
      return true;
    } catch (error) {
      if (error instanceof ApiError && error.status === 404 && !state.handingOver) end();
      toast(error.message, 'error');
      return false;
    }
  }

  async function sendWhisper() {
    const text = whisperText.value.trim();
    if (!text) {
      whisperText.focus();
      return;
    }
    whisperButton.disabled = true;
    const ok = await post('whisper', {text, respond: respond.checked},
      respond.checked ? 'Whispered; the assistant will act on it now' : 'Whispered to the assistant');
    whisperButton.disabled = Boolean(state.ended);
    if (ok) {
      whisperText.value = '';
      respond.checked = false;
    }
  }

  async function toggleListen() {
    if (listener) {
      listener.stop();
      listener = null;
      return;
    }
    listener = new Listener(sid, {
      onState: (s) => {
        const text = {connecting: 'Connecting…', playing: 'Playing both sides, live.', reconnecting: 'Reconnecting…',
          ended: 'The call’s audio has ended.', failed: 'The audio cannot be reached.', stopped: 'Both sides, mixed, as the caller hears them.'}[s] || s;
        listenStatus.textContent = text;
        listenButton.replaceChildren(icon('headphones'), s === 'stopped' ? 'Listen' : 'Stop listening');
        listenButton.classList.toggle('btn-on', s !== 'stopped');
        if (s === 'stopped' || s === 'failed' || s === 'ended') {
          callerMeter.set(0);
          assistantMeter.set(0);
        }
      },
      onStats: (stats) => {
        callerMeter.set(stats.inboundLevel);
        assistantMeter.set(stats.outboundLevel);
      },
    });
    try {
      await listener.start();
    } catch (error) {
      toast(error.message, 'error');
      listener.stop();
      listener = null;
    }
  }

  async function toggleTakeOver() {
    if (talker) {
      const t = talker;
      talker = null;
      t.stop();
      micMeter.el.hidden = true;
      takeStatus.textContent = 'Handing back…';
      renderControls();
      if (await post('handback', undefined, 'The assistant has the call again')) {
        takeStatus.textContent = 'Talk to the caller yourself; the assistant keeps listening.';
      }
      return;
    }
    const t = new Talker(sid, {
      onState: (s) => {
        if (s === 'talking') takeStatus.textContent = 'You are talking to the caller. The assistant is listening.';
        if ((s === 'lost' || s === 'ended') && talker === t) {
          toast('The microphone connection dropped: the call goes back to the assistant', 'error');
          talker = null;
          t.stop();
          micMeter.el.hidden = true;
          post('handback');
          renderControls();
        }
      },
      onLevel: (level) => micMeter.set(level * 3),
    });
    takeButton.disabled = true;
    try {
      await t.openMicrophone();
    } catch (error) {
      toast(`No microphone: ${error.message}`, 'error');
      renderControls();
      return;
    }
    if (!(await post('takeover'))) {
      t.stop();
      renderControls();
      return;
    }
    talker = t;
    micMeter.el.hidden = false;
    if (!listener) toggleListen(); // the operator must hear the caller
    try {
      await t.start();
    } catch (error) {
      toast(error.message, 'error');
    }
    renderControls();
  }

  async function transfer() {
    const target = targetSelect.value;
    if (await confirmDialog(`Transfer this call to ${target}?`, 'The caller is connected there and the assistant leaves the call.', 'Transfer')) {
      post('transfer', {target}, `Transferring to ${target}`);
    }
  }

  async function hangUp() {
    if (await confirmDialog('Hang up this call?', 'The caller is disconnected at once.', 'Hang up', true)) {
      post('hangup', undefined, 'Hanging up');
    }
  }

  // --- the stream ---
  renderHead();
  renderControls();
  const stream = new EventStream(`${path}/events`, {
    onEvent,
    onState: (s) => {
      conn.className = `conn conn-${s}`;
      conn.textContent = {live: 'Live', reconnecting: 'Reconnecting…', connecting: 'Connecting…', closed: state.ended ? 'Ended' : 'Offline'}[s] || s;
    },
    onGone: () => {
      if (state.events) {
        if (!state.ended) end();
      } else {
        waiting.remove();
        scroller.replaceChildren(stateBox('empty', 'This call is not live',
          'It has ended, or it never reached this bridge.',
          h('a', {href: `/console/history/${encodeURIComponent(sid)}`, class: 'btn btn-quiet'}, 'Look for it in the history')));
        end();
      }
    },
  }).start();
  const tick = setInterval(() => {
    const started = state.info && (state.info.started_at || state.info.time);
    if (!started) return;
    const end = state.ended && state.ended.duration_seconds;
    timer.textContent = duration(end ?? since(started));
    renderSpeaking();
  }, 500);

  return () => {
    stream.close();
    clearInterval(tick);
    if (listener) listener.stop();
    if (talker) {
      talker.stop();
      api(`${path}/handback`, {method: 'POST'}).catch(() => {});
    }
  };
}
