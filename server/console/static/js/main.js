// The console's shell: who is logged in, which view the URL names, and in-page navigation
// (each view returns a function that closes its streams and sockets when the page changes).
import {ApiError, api} from './api.js';
import {h, stateBox} from './dom.js';
import {campaignsView, campaignView} from './views/campaigns.js';
import {historyView} from './views/history.js';
import {liveCallView} from './views/live-call.js';
import {liveListView} from './views/live-list.js';
import {pastCallView} from './views/past-call.js';

const ROUTES = [
  [/^\/console\/?$/, 'live', liveListView],
  [/^\/console\/calls\/([^/]+)\/?$/, 'live', liveCallView],
  [/^\/console\/history\/?$/, 'history', historyView],
  [/^\/console\/history\/([^/]+)\/?$/, 'history', pastCallView],
  [/^\/console\/campaigns\/?$/, 'campaigns', campaignsView],
  [/^\/console\/campaigns\/([^/]+)\/?$/, 'campaigns', campaignView],
];

const view = document.getElementById('view');
let config = null;
let cleanup = null;
let generation = 0;

export function navigate(path, {replace = false} = {}) {
  if (path === location.pathname + location.search) return render();
  history[replace ? 'replaceState' : 'pushState'](null, '', path);
  return render();
}

async function render() {
  const mine = ++generation;
  if (cleanup) {
    try {
      cleanup();
    } catch (error) {
      console.error(error);
    }
    cleanup = null;
  }
  const path = location.pathname;
  const route = ROUTES.find(([pattern]) => pattern.test(path));
  for (const tab of document.querySelectorAll('[data-tab]')) {
    tab.classList.toggle('active', Boolean(route) && tab.dataset.tab === route[1]);
  }
  if (!route) {
    view.replaceChildren(stateBox('empty', 'There is no such page', null,
      h('a', {href: '/console', class: 'btn btn-quiet'}, 'Go to the live calls')));
    return;
  }
  const [pattern, , make] = route;
  const params = path.match(pattern).slice(1).map(decodeURIComponent);
  view.replaceChildren();
  window.scrollTo(0, 0);
  const close = await make(view, {params, config, navigate,
    query: new URLSearchParams(location.search), alive: () => mine === generation});
  if (mine === generation) cleanup = close || null;
  else if (close) close();
}

document.addEventListener('click', (event) => {
  const link = event.target.closest('a[href]');
  if (!link || event.defaultPrevented || event.button !== 0 || event.metaKey || event.ctrlKey
      || event.shiftKey || event.altKey || link.target || link.hasAttribute('download')) return;
  const url = new URL(link.href, location.href);
  if (url.origin !== location.origin || !url.pathname.startsWith('/console')
      || url.pathname.startsWith('/console/static') || url.pathname === '/console/login') return;
  event.preventDefault();
  navigate(url.pathname + url.search);
});

window.addEventListener('popstate', render);

async function start() {
  try {
    config = await api('/console/config');
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return; // on the way to the login page
    view.replaceChildren(stateBox('error', 'The console cannot reach the server', error.message,
      h('button', {class: 'btn btn-quiet', onclick: () => location.reload()}, 'Try again')));
    return;
  }
  document.getElementById('operator-name').textContent = config.operator;
  render();
}

start();
