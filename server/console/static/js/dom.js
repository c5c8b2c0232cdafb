// Building DOM without a framework: h('div', {class: 'x', onclick: f}, child, 'text', ...).
// Text always goes in as text nodes, never as HTML: transcripts hold the caller's words.

const SVG_NS = 'http://www.w3.org/2000/svg';

function apply(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on') && typeof value === 'function') {
      el.addEventListener(key.slice(2), value);
    } else if (key === 'dataset') {
      Object.assign(el.dataset, value);
    } else if (key === 'text') {
      el.textContent = value;
    } else if (key === 'value' && 'value' in el) {
      el.value = value;
    } else {
      el.setAttribute(key, value === true ? '' : String(value));
    }
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  apply(el, attrs);
  append(el, children);
  return el;
}

export function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  apply(el, attrs);
  append(el, children);
  return el;
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

// A panel in one of the states every view has: loading, empty, error.
export function stateBox(kind, title, detail, ...extra) {
  return h('div', {class: `state state-${kind}`},
    kind === 'loading' ? h('span', {class: 'spinner'}) : null,
    h('div', null, h('strong', null, title), detail ? h('p', null, detail) : null, ...extra));
}

export function toast(message, kind = 'info') {
  const box = document.getElementById('toasts');
  if (!box) return;
  const item = h('div', {class: `toast toast-${kind}`}, message);
  box.append(item);
  setTimeout(() => item.classList.add('toast-leaving'), 3500);
  setTimeout(() => item.remove(), 4000);
}

// A modal yes/no question on a native <dialog>; resolves true when confirmed.
export function confirmDialog(title, detail, yes, danger = false) {
  return new Promise((resolve) => {
    const dialog = h('dialog', {class: 'dialog'},
      h('form', {method: 'dialog'},
        h('h3', null, title),
        detail ? h('p', null, detail) : null,
        h('div', {class: 'dialog-buttons'},
          h('button', {value: 'no', class: 'btn btn-quiet'}, 'Cancel'),
          h('button', {value: 'yes', class: `btn ${danger ? 'btn-danger' : 'btn-primary'}`}, yes))));
    dialog.addEventListener('close', () => {
      resolve(dialog.returnValue === 'yes');
      dialog.remove();
    });
    document.body.append(dialog);
    dialog.showModal();
  });
}
