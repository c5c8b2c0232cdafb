// A page hook for measurements and tests: timestamped marks of what reached the page (events
// rendered, audio frames received), kept in a bounded list on window.consoleProbe.

const LIMIT = 4000;

const probe = window.consoleProbe || {marks: [], counts: {}, listen: null, talk: null};
window.consoleProbe = probe;

export function mark(kind, data = {}) {
  probe.counts[kind] = (probe.counts[kind] || 0) + 1;
  probe.marks.push({kind, t: performance.timeOrigin + performance.now(), ...data});
  if (probe.marks.length > LIMIT) probe.marks.splice(0, probe.marks.length - LIMIT);
}

export function expose(name, value) {
  probe[name] = value;
}
