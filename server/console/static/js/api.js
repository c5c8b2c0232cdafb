// The operator API over fetch: JSON in and out, the session cookie, one error type.

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export function loginUrl() {
  const here = location.pathname + location.search;
  return `/console/login?next=${encodeURIComponent(here)}`;
}

// The session ended (expired, logged out elsewhere, token changed): log in again, then return.
export function toLogin() {
  location.assign(loginUrl());
}

export async function api(path, {method = 'GET', body, signal} = {}) {
  let response;
  try {
    response = await fetch(path, {
      method,
      signal,
      credentials: 'same-origin',
      cache: 'no-store',
      headers: body === undefined ? {Accept: 'application/json'}
        : {Accept: 'application/json', 'Content-Type': 'application/json'},
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    throw new ApiError(0, 'The server cannot be reached');
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (response.status === 401) {
    toLogin();
    throw new ApiError(401, 'Your session has ended', data);
  }
  if (!response.ok) {
    const message = (data && data.error) || `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, message, data);
  }
  return data;
}

// ws:// or wss:// for a path on this same site.
export function socketUrl(path) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}${path}`;
}
