// The Realtime connection: client secrets for servers that need a key, the
// WebSocket (credential in the `openai-insecure-api-key.` subprotocol, as the
// OpenAI SDK does in a browser), JSON events in and out.

/** What `/demo/info` says: whether a key is needed, whether the models are in. */
export async function serverInfo() {
  let r;
  try {
    r = await fetch('/demo/info', { cache: 'no-store' });
  } catch (e) {
    throw new Error(`The server cannot be reached (${e.message}). Is parley still running?`);
  }
  if (!r.ok) throw new Error(`The server answered ${r.status} to /demo/info.`);
  return r.json();
}

/** Trades an API key for a short-lived client secret. */
export async function mintClientSecret(apiKey, seconds = 600) {
  let r;
  try {
    r = await fetch('/v1/realtime/client_secrets', {
      method: 'POST',
      headers: { Authorization: `Bearer ${apiKey}`, 'Content-Type': 'application/json' },
      body: JSON.stringify({ expires_after: { anchor: 'created_at', seconds } }),
    });
  } catch (e) {
    throw new Error(`The server cannot be reached to get a client secret (${e.message}).`);
  }
  const body = await r.json().catch(() => null);
  if (r.status === 401) {
    const err = new Error('The server refused this API key. Check it and try again.');
    err.badKey = true;
    throw err;
  }
  if (!r.ok || !body || !body.value) {
    throw new Error(`Could not get a client secret: ${(body && body.error && body.error.message) || `HTTP ${r.status}`}`);
  }
  return body;
}

export class RealtimeConnection {
  /**
   * @param {{onEvent: (ev: object) => void, onSent: (ev: object) => void,
   *          onClose: (info: {code: number, reason: string, opened: boolean}) => void}} handlers
   */
  constructor(handlers) {
    this.handlers = handlers;
    this.ws = null;
    this.seq = 0;
  }

  get open() {
    return !!this.ws && this.ws.readyState === WebSocket.OPEN;
  }

  /** Opens `/v1/realtime`; resolves with `session.created`. */
  connect(secret) {
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    const url = `${scheme}://${location.host}/v1/realtime`;
    const protocols = ['realtime'];
    if (secret) protocols.push(`openai-insecure-api-key.${secret}`);
    return new Promise((resolve, reject) => {
      let opened = false;
      let created = false;
      const ws = new WebSocket(url, protocols);
      this.ws = ws;
      ws.onopen = () => {
        opened = true;
      };
      ws.onmessage = (m) => {
        let ev;
        try {
          ev = JSON.parse(m.data);
        } catch (e) {
          this.handlers.onEvent({ type: 'parley.page.bad_message', error: String(e) });
          return;
        }
        if (ev.type === 'session.created' && !created) {
          created = true;
          resolve(ev);
        }
        this.handlers.onEvent(ev);
      };
      ws.onerror = () => {};
      ws.onclose = (e) => {
        this.ws = null;
        if (!created) {
          reject(
            new Error(
              opened
                ? `The server closed the call before it started (code ${e.code}${e.reason ? `: ${e.reason}` : ''}).`
                : 'The server refused the call: a wrong or expired key, the server at its call limit, or the models still loading. See the server log for which.',
            ),
          );
        }
        this.handlers.onClose({ code: e.code, reason: e.reason, opened: created });
      };
    });
  }

  /** Sends one client event (an `event_id` is added). */
  send(ev) {
    if (!this.open) return false;
    if (!ev.event_id) ev.event_id = `evt_page_${++this.seq}`;
    this.ws.send(JSON.stringify(ev));
    this.handlers.onSent(ev);
    return true;
  }

  close() {
    if (this.ws) this.ws.close(1000, 'caller hung up');
  }
}
