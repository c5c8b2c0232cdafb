// Small charts as inline SVG: a bar chart with a value axis, for calls per hour and for the
// latency histogram. Drawn in a fixed viewBox and scaled by CSS, so they fit any card.
import {h, svg} from './dom.js';

// A round top for the value axis that halves into a whole number (counts are whole).
function niceMax(value) {
  if (value <= 2) return 2;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 4, 6, 8, 10]) {
    if (step * power >= value && Number.isInteger((step * power) / 2)) return step * power;
  }
  return 10 * power;
}

// bars: [{label, value, title, tone}]; every `labelEvery`-th label is shown under the axis.
export function barChart(bars, {width = 560, height = 180, labelEvery = 1, unit = '',
  ariaLabel = 'chart', highlight = null} = {}) {
  const pad = {top: 12, right: 8, bottom: 26, left: 34};
  const innerW = width - pad.left - pad.right;
  const innerH = height - pad.top - pad.bottom;
  const top = niceMax(Math.max(0, ...bars.map((b) => b.value)));
  const ticks = [0, top / 2, top];
  const per = innerW / Math.max(1, bars.length);
  labelEvery = Math.max(labelEvery, Math.ceil(44 / per)); // labels never overlap
  const slot = per;
  const barW = Math.max(1, Math.min(36, slot * 0.72));
  const root = svg('svg', {viewBox: `0 0 ${width} ${height}`, width, height, class: 'chart',
    role: 'img', 'aria-label': ariaLabel});
  for (const tick of ticks) {
    const y = pad.top + innerH - (tick / top) * innerH;
    root.append(svg('line', {x1: pad.left, x2: width - pad.right, y1: y, y2: y,
      class: tick === 0 ? 'chart-axis' : 'chart-grid'}));
    root.append(svg('text', {x: pad.left - 6, y: y + 4, class: 'chart-tick', 'text-anchor': 'end'},
      Number.isInteger(tick) ? String(tick) : tick.toFixed(1)));
  }
  bars.forEach((bar, i) => {
    const x = pad.left + i * slot + (slot - barW) / 2;
    const barH = (bar.value / top) * innerH;
    const y = pad.top + innerH - barH;
    const rect = svg('rect', {x, y, width: barW, height: Math.max(bar.value > 0 ? 1.5 : 0, barH),
      rx: Math.min(3, barW / 3), class: `chart-bar${bar.tone ? ` chart-bar-${bar.tone}` : ''}${highlight === i ? ' chart-bar-hot' : ''}`,
      'data-value': bar.value},
    svg('title', null, bar.title || `${bar.label}: ${bar.value}${unit}`));
    root.append(rect);
    if (i % labelEvery === 0) {
      root.append(svg('text', {x: x + barW / 2, y: height - 8, class: 'chart-label',
        'text-anchor': 'middle'}, bar.label));
    }
  });
  return root;
}

// Draw `draw(width)` into `box` now and again whenever the box changes width, so the chart's
// text keeps its size on any screen (a scaled viewBox would shrink or stretch it).
export function fitted(box, draw) {
  let last = 0;
  const render = () => {
    const width = Math.round(box.clientWidth);
    if (width > 0 && width !== last) {
      last = width;
      box.replaceChildren(draw(width));
    }
  };
  const observer = new ResizeObserver(render);
  observer.observe(box);
  render();
  return () => observer.disconnect();
}

export function chartCard(title, figure, chart, footer) {
  return h('section', {class: 'card chart-card'},
    h('header', {class: 'card-head'}, h('h2', null, title), figure ? h('span', {class: 'figure'}, figure) : null),
    h('div', {class: 'chart-box'}, chart),
    footer ? h('footer', {class: 'chart-foot'}, footer) : null);
}
