// How numbers, times and endings read on the page.

export function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return '–';
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const rest = String(s % 60).padStart(2, '0');
  return h ? `${h}:${String(m).padStart(2, '0')}:${rest}` : `${m}:${rest}`;
}

export function since(iso) {
  const start = Date.parse(iso);
  return isFinite(start) ? (Date.now() - start) / 1000 : null;
}

export function ms(value) {
  if (value === null || value === undefined || !isFinite(value)) return '–';
  return value >= 1000 ? `${(value / 1000).toFixed(value >= 10000 ? 0 : 1)} s` : `${Math.round(value)} ms`;
}

export function clock(iso) {
  const d = new Date(iso);
  return isNaN(d) ? '–' : d.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit', second: '2-digit'});
}

export function dateTime(iso) {
  const d = new Date(iso);
  if (isNaN(d)) return '–';
  const today = new Date();
  const sameDay = d.toDateString() === today.toDateString();
  const time = d.toLocaleTimeString([], {hour: '2-digit', minute: '2-digit'});
  return sameDay ? `Today ${time}`
    : `${d.toLocaleDateString([], {day: 'numeric', month: 'short', year: d.getFullYear() === today.getFullYear() ? undefined : 'numeric'})} ${time}`;
}

export function usd(value) {
  if (value === null || value === undefined || !isFinite(value)) return '–';
  return value < 0.01 ? `$${value.toFixed(4)}` : `$${value.toFixed(2)}`;
}

// The server masks numbers unless LOG_PII; this keeps the same shape for anything it did not.
export function maskNumber(number) {
  if (!number) return 'Unknown';
  if (number.includes('*') || number.includes('•')) return number;
  if (number.length < 8) return '***';
  return `${number.slice(0, 5)}***${number.slice(-4)}`;
}

export const ENDINGS = {
  caller_hung_up: ['Caller hung up', 'ok'],
  assistant_ended: ['Assistant ended', 'ok'],
  transferred: ['Transferred', 'ok'],
  admin_hung_up: ['Operator hung up', 'neutral'],
  time_limit: ['Time limit', 'neutral'],
  idle: ['Went silent', 'neutral'],
  handover: ['Handed over', 'neutral'],
  shutdown: ['Server stopped', 'neutral'],
  voicemail: ['Voicemail', 'neutral'],
  no_answer: ['No answer', 'neutral'],
  busy: ['Busy', 'neutral'],
  openai_error: ['Model error', 'bad'],
  internal_error: ['Internal error', 'bad'],
  bad_input: ['Bad input', 'bad'],
  rejected: ['Rejected', 'bad'],
};

export function ending(kind) {
  if (!kind) return ['In progress', 'live'];
  const known = ENDINGS[kind];
  return known || [kind.replace(/_/g, ' ').replace(/^./, (c) => c.toUpperCase()), 'neutral'];
}

export function plural(n, one, many = `${one}s`) {
  return `${n} ${n === 1 ? one : many}`;
}

export function median(values) {
  const sorted = values.filter((v) => typeof v === 'number' && isFinite(v)).sort((a, b) => a - b);
  if (!sorted.length) return null;
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

export function pretty(value) {
  if (typeof value === 'string') return value;
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}
