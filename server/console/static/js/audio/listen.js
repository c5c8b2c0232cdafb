// Listen in: the call's audio from GET /calls/{sid}/listen (Twilio's media messages, both
// tracks) into the listen-player worklet, which mixes and plays them at real time.
import {socketUrl} from '../api.js';
import {expose, mark} from '../probe.js';
import {base64ToBytes} from './mulaw.js';

const WORKLET = new URL('./listen-worklet.js', import.meta.url);

async function audioContext() {
  try {
    return new AudioContext({sampleRate: 8000, latencyHint: 'interactive'});
  } catch {
    return new AudioContext({latencyHint: 'interactive'}); // the worklet resamples
  }
}

export class Listener {
  constructor(callSid, {onState = () => {}, onStats = () => {}} = {}) {
    this.callSid = callSid;
    this.onState = onState;
    this.onStats = onStats;
    this.stats = null;
    this.clears = 0;
    this.closed = false;
  }

  async start() {
    if (!window.isSecureContext || !window.AudioWorkletNode) {
      throw new Error('Listening needs the console over https (or on localhost)');
    }
    this.onState('connecting');
    this.context = await audioContext();
    await this.context.audioWorklet.addModule(WORKLET);
    if (this.closed) return;
    this.node = new AudioWorkletNode(this.context, 'listen-player',
      {numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1]});
    this.node.port.onmessage = ({data}) => {
      this.stats = data;
      if (data.cleared) mark('audio.cleared', {droppedMs: data.droppedMs, outboundMs: data.outboundMs});
      this.onStats(data);
    };
    this.node.connect(this.context.destination);
    await this.context.resume();
    expose('listen', this);
    this.connect();
  }

  connect() {
    const ws = this.ws = new WebSocket(socketUrl(`/calls/${encodeURIComponent(this.callSid)}/listen`));
    ws.onopen = () => {
      this.failures = 0;
      this.onState('playing');
    };
    ws.onmessage = ({data}) => this.receive(data);
    ws.onclose = (event) => {
      if (this.closed) return;
      if (this.again) { // the call moved to another instance: listen there
        this.again = false;
        this.onState('reconnecting');
        this.retry = setTimeout(() => this.connect(), 100);
        return;
      }
      // 1000/1001: the call ended or the server closed on purpose; anything else: try again.
      if (event.code === 1000 || event.code === 1001 || event.code === 4404) {
        this.onState('ended');
      } else if ((this.failures = (this.failures || 0) + 1) > 4) {
        this.onState('failed'); // refused (ended call, no rights) or the server is gone
      } else {
        this.onState('reconnecting');
        this.retry = setTimeout(() => this.connect(), 500 * this.failures);
      }
    };
  }

  // The call is live again elsewhere (a handover): open a new socket once this one is closed.
  reconnect() {
    if (this.closed || !this.ws) return;
    clearTimeout(this.retry);
    if (this.ws.readyState === WebSocket.CLOSED) {
      this.failures = 0;
      this.onState('reconnecting');
      this.connect();
    } else {
      this.again = true;
    }
  }

  receive(text) {
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      return;
    }
    if (message.event === 'media' && message.media && typeof message.media.payload === 'string') {
      const track = message.media.track === 'outbound' ? 'outbound' : 'inbound';
      const bytes = base64ToBytes(message.media.payload);
      mark('audio', {track, bytes: bytes.length, head: message.media.payload.slice(0, 24)});
      this.node.port.postMessage({track, bytes}, [bytes.buffer]);
    } else if (message.event === 'clear') {
      this.clears += 1;
      mark('audio.clear', {n: this.clears});
      this.node.port.postMessage({clear: true, clearId: this.clears});
    }
  }

  stop() {
    this.closed = true;
    clearTimeout(this.retry);
    if (this.ws) this.ws.close(1000);
    if (this.node) {
      this.node.port.postMessage({stop: true});
      this.node.disconnect();
    }
    if (this.context) this.context.close();
    this.onState('stopped');
  }
}
