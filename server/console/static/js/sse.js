// Server-Sent Events over fetch (not EventSource: it hides the status code, and a 404 or 401
// must end the stream rather than retry forever). Reconnects with Last-Event-ID and backs off;
// reports its state: connecting, live, reconnecting, closed.
import {toLogin} from './api.js';

const BACKOFF_MS = [250, 500, 1000, 2000, 4000];

export class EventStream {
  constructor(url, {onEvent, onState = () => {}, onGone = () => {}, onOpen = () => {}}) {
    this.url = url;
    this.onEvent = onEvent;
    this.onState = onState;
    this.onGone = onGone;
    this.onOpen = onOpen;
    this.lastId = null;
    this.attempt = 0;
    this.controller = null;
    this.closed = false;
    this.state = 'connecting';
    this.gapUntil = 0;
  }

  // A handed-over call is live nowhere for a moment, between its old stream's end and its new
  // one's start: until then a 404 means "not yet", and the stream keeps trying.
  expectGap(ms) {
    this.gapUntil = Date.now() + ms;
  }

  start() {
    this.loop();
    return this;
  }

  close() {
    this.closed = true;
    if (this.controller) this.controller.abort();
    this.setState('closed');
  }

  setState(state) {
    if (this.state !== state) {
      this.state = state;
      this.onState(state);
    }
  }

  async loop() {
    while (!this.closed) {
      this.controller = new AbortController();
      try {
        const headers = {Accept: 'text/event-stream'};
        if (this.lastId !== null) headers['Last-Event-ID'] = this.lastId;
        const response = await fetch(this.url, {headers, signal: this.controller.signal,
          credentials: 'same-origin', cache: 'no-store'});
        if (response.status === 401) {
          this.closed = true;
          toLogin();
          return;
        }
        if ((response.status === 404 || response.status === 410) && Date.now() >= this.gapUntil) {
          this.closed = true;
          this.setState('closed');
          this.onGone(response.status);
          return;
        }
        if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
        this.attempt = 0;
        this.setState('live');
        this.onOpen();
        await this.read(response.body);
      } catch (error) {
        if (this.closed) return;
      }
      if (this.closed) return;
      this.setState('reconnecting');
      const wait = BACKOFF_MS[Math.min(this.attempt, BACKOFF_MS.length - 1)];
      this.attempt += 1;
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }

  async read(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = '';
    let data = [];
    let id = null;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) return;
      buffer += value;
      let newline;
      while ((newline = buffer.indexOf('\n')) >= 0) {
        let line = buffer.slice(0, newline);
        buffer = buffer.slice(newline + 1);
        if (line.endsWith('\r')) line = line.slice(0, -1);
        if (line === '') {
          if (data.length) this.dispatch(data.join('\n'), id);
          data = [];
          id = null;
        } else if (line.startsWith(':')) {
          // a heartbeat
        } else {
          const colon = line.indexOf(':');
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? '' : line.slice(colon + 1);
          if (text.startsWith(' ')) text = text.slice(1);
          if (field === 'data') data.push(text);
          else if (field === 'id') id = text;
        }
      }
    }
  }

  dispatch(text, id) {
    if (id !== null) this.lastId = id;
    let event;
    try {
      event = JSON.parse(text);
    } catch {
      return; // not ours: skip it, keep the stream
    }
    if (event && typeof event === 'object') this.onEvent(event);
  }
}
