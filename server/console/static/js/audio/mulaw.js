// G.711 mu-law, as Twilio sends and takes it (8 kHz, one byte a sample). Shared by the page
// and both AudioWorklets (no atob/btoa in a worklet: base64 stays on the page).

const BIAS = 0x84;
const CLIP = 32635;

// mu-law byte -> float sample in [-1, 1).
export const DECODE = (() => {
  const table = new Float32Array(256);
  for (let i = 0; i < 256; i++) {
    const u = ~i & 0xff;
    const magnitude = ((((u & 0x0f) << 3) + BIAS) << ((u & 0x70) >> 4)) - BIAS;
    table[i] = (u & 0x80 ? -magnitude : magnitude) / 32768;
  }
  return table;
})();

// float sample in [-1, 1] -> mu-law byte.
export function encodeSample(x) {
  let s = Math.round(x * 32768);
  let sign = 0;
  if (s < 0) {
    sign = 0x80;
    s = -s;
  }
  if (s > CLIP) s = CLIP;
  s += BIAS;
  let exponent = 7;
  for (let mask = 0x4000; (s & mask) === 0 && exponent > 0; mask >>= 1) exponent--;
  const mantissa = (s >> (exponent + 3)) & 0x0f;
  return ~(sign | (exponent << 4) | mantissa) & 0xff;
}

export function base64ToBytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

export function bytesToBase64(bytes) {
  let binary = '';
  for (let i = 0; i < bytes.length; i++) binary += String.fromCharCode(bytes[i]);
  return btoa(binary);
}
