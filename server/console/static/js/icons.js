// A few line icons as inline SVG (no icon font, no emoji: the page renders the same anywhere).
import {svg} from './dom.js';

const PATHS = {
  phone: 'M6.6 3.5h2.2l1.3 3.6-1.7 1.2a9.5 9.5 0 0 0 4.3 4.3l1.2-1.7 3.6 1.3v2.2c0 .9-.7 1.6-1.6 1.6A12.8 12.8 0 0 1 5 5.1c0-.9.7-1.6 1.6-1.6z',
  headphones: 'M4 13v-2a6 6 0 0 1 12 0v2 M4 13h2.5v4H5a1 1 0 0 1-1-1z M16 13h-2.5v4H15a1 1 0 0 0 1-1z',
  mic: 'M10 3a2.5 2.5 0 0 1 2.5 2.5v4a2.5 2.5 0 0 1-5 0v-4A2.5 2.5 0 0 1 10 3z M5.5 9.5a4.5 4.5 0 0 0 9 0 M10 14v3',
  message: 'M4 5h12v8H9l-3.5 3v-3H4z',
  inbound: 'M14 6l-8 8 M6 8.5V14h5.5',
  outbound: 'M6 14l8-8 M8.5 6H14v5.5',
  tool: 'M12.5 3.5a3.5 3.5 0 0 0-3.3 4.6L4 13.3 6.7 16l5.2-5.2a3.5 3.5 0 0 0 4.6-3.3l-2 2-2.2-.4-.4-2.2z',
  keypad: 'M5 4h2v2H5zM9 4h2v2H9zM13 4h2v2h-2zM5 8h2v2H5zM9 8h2v2H9zM13 8h2v2h-2zM5 12h2v2H5zM9 12h2v2H9zM13 12h2v2h-2zM9 16h2v2H9z',
  clock: 'M10 3.5a6.5 6.5 0 1 1 0 13 6.5 6.5 0 0 1 0-13z M10 6.5V10l2.5 1.5',
  cut: 'M4 10h3 M9 10h2 M13 10h3',
  handoff: 'M4 10h9 M10 6.5l3.5 3.5-3.5 3.5 M16 5v10',
  back: 'M12 5l-5 5 5 5',
  end: 'M3.5 11.5c3.6-3.2 9.4-3.2 13 0l-1.6 2-2.8-1.3v-2a10 10 0 0 0-4.2 0v2l-2.8 1.3z',
  play: 'M7 5l8 5-8 5z',
  note: 'M5 4h10v12H5z M7.5 8h5 M7.5 11h5',
  warn: 'M10 3.5l7 12.5H3z M10 8.5v3.5 M10 14v.2',
  record: 'M10 5a5 5 0 1 1 0 10 5 5 0 0 1 0-10z',
};

export function icon(name, cls = '') {
  const filled = name === 'phone' || name === 'play' || name === 'record' || name === 'keypad' || name === 'end';
  return svg('svg', {viewBox: '0 0 20 20', class: `icon ${cls}`, 'aria-hidden': 'true',
    fill: filled ? 'currentColor' : 'none', stroke: filled ? 'none' : 'currentColor',
    'stroke-width': '1.6', 'stroke-linecap': 'round', 'stroke-linejoin': 'round'},
  svg('path', {d: PATHS[name] || PATHS.note}));
}
