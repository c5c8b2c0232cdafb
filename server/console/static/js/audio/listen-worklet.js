// The listen-in player (AudioWorklet): mu-law frames of both tracks in, one mixed output.
//
// Each track has its own jitter buffer: it starts (and, after running dry, restarts) playing
// only once TARGET_MS are queued, so frames that arrive unevenly still play evenly. The caller
// (inbound) arrives at real time, so its buffer is kept short: past INBOUND_MAX_MS the oldest
// audio goes. The assistant (outbound) arrives in bursts faster than real time (the bridge
// relays the model's audio as it comes), so its buffer holds a whole reply; a `clear` (the
// caller barged in) empties it at once, before the next render quantum.
import {DECODE} from './mulaw.js';

const TARGET_MS = 60;
const INBOUND_MAX_MS = 600;
const OUTBOUND_MAX_MS = 60000;
const REPORT_EVERY = 3; // render quanta between stats messages (128 frames each)

class Track {
  constructor(maxMs) {
    this.capacity = maxMs * 8;
    this.data = new Float32Array(this.capacity);
    this.read = 0; // float index into the ring (fractional when resampling)
    this.count = 0; // samples queued (8 kHz)
    this.waiting = true; // (re)filling to TARGET_MS before playing
    this.frames = 0; // frames received
    this.played = 0; // 8 kHz samples played
    this.underruns = 0;
    this.dropped = 0; // samples dropped: overflow or clear
  }

  push(bytes) {
    this.frames++;
    const n = bytes.length;
    if (n > this.capacity) return;
    if (this.count + n > this.capacity) { // too far behind: drop the oldest
      const over = this.count + n - this.capacity;
      this.read = (this.read + over) % this.capacity;
      this.count -= over;
      this.dropped += over;
    }
    let write = (Math.floor(this.read) + this.count) % this.capacity;
    for (let i = 0; i < n; i++) {
      this.data[write] = DECODE[bytes[i]];
      write = write + 1 === this.capacity ? 0 : write + 1;
    }
    this.count += n;
  }

  clear() {
    const dropped = this.count;
    this.dropped += dropped;
    this.count = 0;
    this.waiting = true;
    return dropped;
  }

  // Add this track into `out` (at the context's rate; `step` input samples per output sample);
  // returns the loudest sample it added.
  mixInto(out, step) {
    let peak = 0;
    if (this.waiting) {
      if (this.count < TARGET_MS * 8) return peak;
      this.waiting = false;
    }
    const cap = this.capacity;
    for (let i = 0; i < out.length; i++) {
      if (this.count < 2) {
        this.underruns++;
        this.waiting = true;
        return peak;
      }
      const base = Math.floor(this.read);
      const frac = this.read - base;
      const a = this.data[base];
      const b = this.data[base + 1 === cap ? 0 : base + 1];
      const v = a + (b - a) * frac;
      out[i] += v;
      if (v > peak) peak = v;
      else if (-v > peak) peak = -v;
      let next = this.read + step;
      const whole = Math.floor(next) - base;
      if (whole) {
        this.count -= whole;
        this.played += whole;
      }
      if (next >= cap) next -= cap;
      this.read = next;
    }
    return peak;
  }

  ms() {
    return this.count / 8;
  }
}

class ListenPlayer extends AudioWorkletProcessor {
  constructor() {
    super();
    this.tracks = {inbound: new Track(INBOUND_MAX_MS), outbound: new Track(OUTBOUND_MAX_MS)};
    this.step = 8000 / sampleRate;
    this.quanta = 0;
    this.peak = {inbound: 0, outbound: 0};
    this.port.onmessage = ({data}) => {
      if (data.clear) {
        const dropped = this.tracks.outbound.clear();
        this.report({cleared: true, droppedMs: dropped / 8, clearId: data.clearId});
      } else if (data.bytes) {
        const track = this.tracks[data.track];
        if (track) track.push(data.bytes);
      } else if (data.stop) {
        this.stopped = true;
      }
    };
  }

  report(extra = {}) {
    const {inbound, outbound} = this.tracks;
    this.port.postMessage({
      inboundMs: inbound.ms(), outboundMs: outbound.ms(),
      inboundFrames: inbound.frames, outboundFrames: outbound.frames,
      inboundPlayed: inbound.played, outboundPlayed: outbound.played,
      underruns: inbound.underruns + outbound.underruns,
      inboundLevel: this.peak.inbound, outboundLevel: this.peak.outbound,
      time: currentTime, ...extra,
    });
    this.peak.inbound = 0;
    this.peak.outbound = 0;
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    if (!out) return !this.stopped;
    out.fill(0);
    for (const name of ['inbound', 'outbound']) {
      const peak = this.tracks[name].mixInto(out, this.step);
      if (peak > this.peak[name]) this.peak[name] = Math.min(1, peak);
    }
    for (let i = 0; i < out.length; i++) {
      if (out[i] > 1) out[i] = 1;
      else if (out[i] < -1) out[i] = -1;
    }
    for (let c = 1; c < outputs[0].length; c++) outputs[0][c].set(out);
    if (++this.quanta % REPORT_EVERY === 0) this.report();
    return !this.stopped;
  }
}

registerProcessor('listen-player', ListenPlayer);
