// Take over: the operator's microphone (echo cancellation on) through the talk-capture
// worklet, 20 ms mu-law frames sent on GET /calls/{sid}/talk as Twilio-style media messages.
import {socketUrl} from '../api.js';
import {expose, mark} from '../probe.js';
import {bytesToBase64} from './mulaw.js';

const WORKLET = new URL('./talk-worklet.js', import.meta.url);

export class Talker {
  constructor(callSid, {onState = () => {}, onLevel = () => {}} = {}) {
    this.callSid = callSid;
    this.onState = onState;
    this.onLevel = onLevel;
    this.sent = 0;
    this.closed = false;
  }

  // The microphone first: if the operator refuses it, the call is never taken over.
  async openMicrophone() {
    if (!window.isSecureContext || !navigator.mediaDevices || !window.AudioWorkletNode) {
      throw new Error('Talking needs the console over https (or on localhost)');
    }
    this.stream = await navigator.mediaDevices.getUserMedia({audio: {
      echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1}});
    const [track] = this.stream.getAudioTracks();
    this.settings = track ? track.getSettings() : {};
    expose('talk', this);
  }

  async start() {
    this.context = new AudioContext({latencyHint: 'interactive'});
    await this.context.audioWorklet.addModule(WORKLET);
    this.source = this.context.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.context, 'talk-capture',
      {numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1]});
    const mute = this.context.createGain();
    mute.gain.value = 0; // pulled by the graph, never heard
    this.source.connect(this.node).connect(mute).connect(this.context.destination);
    this.ws = new WebSocket(socketUrl(`/calls/${encodeURIComponent(this.callSid)}/talk`));
    this.ws.onopen = () => this.onState('talking');
    this.ws.onclose = (event) => {
      if (!this.closed) this.onState(event.code === 1000 ? 'ended' : 'lost');
    };
    this.node.port.onmessage = ({data}) => {
      this.onLevel(data.level);
      if (this.ws.readyState !== WebSocket.OPEN) return;
      this.ws.send(JSON.stringify({event: 'media', media: {payload: bytesToBase64(data.frame)}}));
      this.sent += 1;
      if (this.sent % 50 === 1) mark('talk.frame', {n: this.sent});
    };
    await this.context.resume();
  }

  stop() {
    this.closed = true;
    if (this.ws) this.ws.close(1000);
    if (this.node) {
      this.node.port.postMessage({stop: true});
      this.node.disconnect();
    }
    if (this.source) this.source.disconnect();
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    if (this.context) this.context.close();
    this.onState('stopped');
  }
}
