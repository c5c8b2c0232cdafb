// The operator's microphone for take-over (AudioWorklet): at the context's rate in, 20 ms
// mu-law frames at 8 kHz out (posted to the page, which sends them on the talk socket).
//
// Downsampling is a windowed-sinc low-pass (cut-off 3.6 kHz, under the 4 kHz Nyquist of the
// phone line) evaluated only where an output sample falls, so any input rate works (48 kHz,
// 44.1 kHz, ...). Kernels are cached per fractional phase (1/64 of an input sample).
import {encodeSample} from './mulaw.js';

const OUT_RATE = 8000;
const FRAME_BYTES = 160; // 20 ms
const CUTOFF_HZ = 3600;
const PHASES = 64;

class TalkCapture extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ratio = sampleRate / OUT_RATE; // input samples per output sample
    this.half = Math.ceil(this.ratio * 6); // kernel half-width, in input samples
    this.gain = (2 * CUTOFF_HZ) / sampleRate;
    this.kernels = new Map();
    this.buffer = new Float32Array(4 * this.half + 2048);
    this.length = 0; // samples in buffer
    this.pos = this.half; // where the next output sample is centred (index into buffer)
    this.frame = new Uint8Array(FRAME_BYTES);
    this.filled = 0;
    this.sumSquares = 0;
    this.frames = 0;
    this.stopped = false;
    this.port.onmessage = ({data}) => {
      if (data.stop) this.stopped = true;
    };
  }

  kernel(frac) {
    const phase = Math.round(frac * PHASES) % PHASES;
    let k = this.kernels.get(phase);
    if (!k) {
      const offset = phase / PHASES;
      const half = this.half;
      k = new Float32Array(2 * half + 1);
      for (let j = -half; j <= half; j++) {
        const t = j - offset; // distance from the output sample, in input samples
        const x = this.gain * t;
        const sinc = x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x);
        const w = 0.5 + 0.5 * Math.cos((Math.PI * t) / (half + 1)); // Hann
        k[j + half] = this.gain * sinc * w;
      }
      this.kernels.set(phase, k);
    }
    return k;
  }

  emit(sample) {
    this.sumSquares += sample * sample;
    this.frame[this.filled++] = encodeSample(sample);
    if (this.filled === FRAME_BYTES) {
      const frame = this.frame;
      this.frames++;
      this.port.postMessage({frame, level: Math.sqrt(this.sumSquares / FRAME_BYTES),
        index: this.frames}, [frame.buffer]);
      this.frame = new Uint8Array(FRAME_BYTES);
      this.filled = 0;
      this.sumSquares = 0;
    }
  }

  process(inputs) {
    if (this.stopped) return false;
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    if (this.length + input.length > this.buffer.length) { // never: compacted below
      this.length = 0;
      this.pos = this.half;
    }
    this.buffer.set(input, this.length);
    this.length += input.length;
    const half = this.half;
    while (this.pos + half + 1 < this.length) {
      const base = Math.floor(this.pos);
      const k = this.kernel(this.pos - base);
      let acc = 0;
      const start = base - half;
      for (let j = 0; j < k.length; j++) acc += k[j] * this.buffer[start + j];
      this.emit(acc > 1 ? 1 : acc < -1 ? -1 : acc);
      this.pos += this.ratio;
    }
    // Keep only what the next output samples still need.
    const keep = Math.floor(this.pos) - half;
    if (keep > 0) {
      this.buffer.copyWithin(0, keep, this.length);
      this.length -= keep;
      this.pos -= keep;
    }
    return true;
  }
}

registerProcessor('talk-capture', TalkCapture);
