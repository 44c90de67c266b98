// The page's views: transcript (with tool cards), latency waterfall and history,
// level meters, event log. Plain DOM; no framework.

/** Creates an element: `el('div.a.b', {title: 'x'}, child, 'text')`. */
export function el(spec, attrs = {}, ...children) {
  const [tag, ...classes] = spec.split('.');
  const node = document.createElement(tag || 'div');
  if (classes.length) node.className = classes.join(' ');
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'text') node.textContent = v;
    else if (k === 'dataset') Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

const clock = (t0) => {
  const s = Math.max(0, Math.round((performance.now() - t0) / 1000));
  return `${String(Math.floor(s / 60)).padStart(2, '0')}:${String(s % 60).padStart(2, '0')}`;
};

function prettyJson(text) {
  try {
    return JSON.stringify(typeof text === 'string' ? JSON.parse(text) : text, null, 2);
  } catch {
    return String(text);
  }
}

/** The conversation: caller and agent turns, tool cards, in order. */
export class Transcript {
  constructor(root) {
    this.root = root;
    this.items = new Map();
    this.tools = new Map();
    this.t0 = performance.now();
    this.lines = [];
  }

  reset() {
    this.root.replaceChildren();
    this.items.clear();
    this.tools.clear();
    this.t0 = performance.now();
    this.lines = [];
  }

  scroll() {
    this.root.scrollTop = this.root.scrollHeight;
  }

  bubble(id, role, label) {
    let entry = this.items.get(id);
    if (entry) return entry;
    const text = el('span.text');
    const partial = el('span.partial');
    const meta = el('span.meta', { text: clock(this.t0) });
    const node = el(`div.msg.${role}`, { dataset: { item: id } }, el('div.who', {}, el('b', { text: label }), meta), el('div.body', {}, text, partial));
    this.root.querySelector('.empty')?.remove();
    this.root.append(node);
    entry = { node, text, partial, role, final: '', streamed: '', time: meta.textContent };
    this.items.set(id, entry);
    this.scroll();
    return entry;
  }

  /** The caller started speaking (item id from `speech_started`). */
  userSpeaking(id) {
    // An earlier stretch of speech that has produced no words yet (a cough, a
    // backchannel, or a transcript still on its way) stops saying "listening".
    for (const [other, b] of this.items) if (other !== id && b.role === 'user' && !b.final && !b.streamed) b.node.classList.add('stale');
    const b = this.bubble(id, 'user', 'You');
    if (!b.final && !b.streamed) b.node.classList.add('listening');
  }

  /** Stable partial words of the caller's turn. */
  userPartial(id, delta) {
    const b = this.bubble(id, 'user', 'You');
    b.streamed += delta;
    b.partial.textContent = b.streamed;
    this.scroll();
  }

  /** The caller's final transcript (or typed text). */
  userFinal(id, text, typed = false) {
    const b = this.bubble(id, 'user', typed ? 'You (typed)' : 'You');
    b.node.classList.remove('listening');
    b.final = text;
    b.text.textContent = text || '(nothing recognised)';
    b.partial.textContent = '';
    this.lines.push({ time: b.time, who: 'You', text });
    this.scroll();
  }

  /** The caller's item produced no words (a cough, a backchannel). */
  dropUser(id) {
    const b = this.items.get(id);
    if (b && !b.final && !b.streamed) {
      b.node.remove();
      this.items.delete(id);
    }
  }

  agentStart(id) {
    const b = this.bubble(id, 'agent', 'Agent');
    b.node.classList.add('streaming');
  }

  agentDelta(id, delta) {
    const b = this.bubble(id, 'agent', 'Agent');
    b.streamed += delta;
    b.text.textContent = b.streamed;
    this.scroll();
  }

  /** The reply is over; `status` is the response's status. */
  agentDone(id, status, transcript) {
    const b = this.items.get(id);
    if (!b) return;
    b.node.classList.remove('streaming');
    if (!b.interrupted && status === 'completed' && transcript && transcript.length >= b.streamed.length) {
      b.streamed = transcript;
      b.text.textContent = transcript;
    }
    if (!b.line) {
      b.line = { time: b.time, who: 'Agent', text: b.interrupted ? b.cutText : b.streamed };
      this.lines.push(b.line);
    }
  }

  /** The caller interrupted: cut the reply where playback stopped, mark it. */
  agentInterrupted(id, heardFraction, playedMs) {
    const b = this.items.get(id);
    if (!b || b.interrupted) return;
    b.interrupted = true;
    const full = b.streamed;
    let cut = Math.round(full.length * Math.max(0, Math.min(1, heardFraction)));
    while (cut > 0 && cut < full.length && !/\s/.test(full[cut])) cut--;
    b.heard = full.slice(0, cut).trimEnd();
    b.text.textContent = b.heard;
    const rest = full.slice(cut);
    if (rest.trim()) b.partial.replaceChildren(el('s.unheard', { text: rest, title: 'not heard: the caller interrupted' }));
    b.node.classList.add('interrupted');
    b.cutText = `${b.heard} [interrupted at ${(playedMs / 1000).toFixed(1)} s]`;
    if (b.line) b.line.text = b.cutText;
    b.node.querySelector('.who').append(el('span.badge.cut', { text: `interrupted at ${(playedMs / 1000).toFixed(1)} s` }));
    this.scroll();
  }

  /** A tool call as a card: name, arguments, then result and duration. */
  toolCall(callId, name, args, runsOn) {
    this.root.querySelector('.empty')?.remove();
    const result = el('pre.result.pending', { text: runsOn === 'client' ? 'waiting for the client…' : 'running…' });
    const dur = el('span.duration', { text: '…' });
    const card = el(
      'div.tool-card',
      { dataset: { call: callId, name } },
      el('div.tool-head', {}, el('span.tool-icon', { text: 'ƒ' }), el('b.tool-name', { text: name }), el('span.badge', { text: runsOn || 'server' }), dur),
      el('div.tool-section', {}, el('span.label', { text: 'arguments' }), el('pre.args', { text: prettyJson(args) })),
      el('div.tool-section', {}, el('span.label', { text: 'result' }), result),
    );
    // A reply that has not said anything yet comes after its tool calls.
    const waiting = [...this.items.values()].find((b) => b.role === 'agent' && b.node.classList.contains('streaming') && !b.streamed);
    if (waiting) this.root.insertBefore(card, waiting.node);
    else this.root.append(card);
    this.tools.set(callId, { card, result, dur, started: performance.now(), name, args, time: clock(this.t0) });
    this.scroll();
  }

  toolResult(callId, output) {
    const t = this.tools.get(callId);
    if (!t) return;
    const ms = performance.now() - t.started;
    t.result.classList.remove('pending');
    t.result.textContent = prettyJson(output);
    t.dur.textContent = `${ms < 1000 ? Math.round(ms) + ' ms' : (ms / 1000).toFixed(2) + ' s'}`;
    t.card.classList.add('done');
    let failed = false;
    try {
      failed = !!JSON.parse(output).error;
    } catch {}
    if (failed) t.card.classList.add('failed');
    this.lines.push({ time: t.time, who: 'Tool', text: `${t.name}(${t.args}) → ${output} (${Math.round(ms)} ms)` });
    this.scroll();
  }

  /** The call as plain text, for download. */
  text() {
    return this.lines.map((l) => `[${l.time}] ${l.who}: ${l.text}`).join('\n') + '\n';
  }
}

const STAGES = [
  { key: 'endpoint_ms', label: 'end of turn', cls: 's-endpoint' },
  { key: 'transcript_ms', label: 'transcript', cls: 's-transcript' },
  { key: 'first_token_ms', label: 'first token', cls: 's-token' },
  { key: 'first_audio_ms', label: 'first audio', cls: 's-audio' },
];

const ms = (v) => (v === null || v === undefined ? '—' : `${Math.round(v)} ms`);

/** Per-turn latency: the last turn as a waterfall, a history chart, a table. */
export class Latency {
  constructor(waterfall, history, rows) {
    this.waterfall = waterfall;
    this.history = history;
    this.rows = rows;
    this.turns = [];
  }

  reset() {
    this.turns = [];
    this.waterfall.replaceChildren(el('p.empty', { text: "Each turn's breakdown appears here." }));
    this.history.replaceChildren();
    this.rows.replaceChildren();
  }

  add(m) {
    this.turns.push(m);
    const n = this.turns.length;
    const total = Math.max(...STAGES.map((s) => m[s.key] || 0), 1);
    const bars = [];
    let prev = 0;
    for (const s of STAGES) {
      const v = m[s.key];
      if (v === null || v === undefined) continue;
      const bar = el(`div.wf-bar.${s.cls}`, { title: `${s.label}: ${Math.round(v - prev)} ms (at ${Math.round(v)} ms)` });
      bar.style.marginLeft = `${(prev / total) * 100}%`;
      bar.style.width = `${Math.max(0.5, ((v - prev) / total) * 100)}%`;
      bars.push(el('div.wf-row', {}, el('span.wf-label', { text: s.label }), el('div.wf-track', {}, bar), el('span.wf-value', { text: `+${Math.round(v - prev)} → ${ms(v)}` })));
      prev = Math.max(prev, v);
    }
    const extra = [];
    if (m.asr_ms != null) extra.push(`speech-to-text ${ms(m.asr_ms)}`);
    if (m.prefill_ms) extra.push(`prefill ${ms(m.prefill_ms)}`);
    if (m.first_tts_ms != null) extra.push(`first phrase synthesized in ${ms(m.first_tts_ms)}`);
    if (m.prompt_tokens) extra.push(`${m.prompt_tokens} prompt tokens, ${m.cached_tokens} from cache`);
    const typed = m.endpoint_ms == null && m.transcript_ms == null;
    if (!bars.length) bars.push(el('p.empty', { text: 'No timings for this turn (typed, and no audio).' }));
    this.waterfall.replaceChildren(
      el('div.wf-title', {}, el('b', { text: `Turn ${n}` }), el('span.wf-total', { text: `${typed ? (m.page_measured ? 'typed turn, from Enter · ' : 'typed turn · ') : ''}total ${ms(m.first_audio_ms ?? (prev || null))}` })),
      ...bars,
      el('div.wf-extra', { text: extra.join(' · ') }),
    );
    this.rows.prepend(
      el(
        'tr.latency-row',
        { dataset: { response: m.response_id || '' } },
        el('td', { text: String(n) }),
        ...STAGES.map((s) => el('td', { text: ms(m[s.key]) })),
        el('td', { text: m.prompt_tokens ? `${m.prompt_tokens} (${m.cached_tokens})` : '—' }),
      ),
    );
    this.drawHistory();
  }

  drawHistory() {
    const last = this.turns.slice(-24);
    const top = Math.max(...last.map((m) => m.first_audio_ms || m.first_token_ms || 0), 1);
    this.history.replaceChildren(
      ...last.map((m, i) => {
        const col = el('div.h-col', { title: `turn ${this.turns.length - last.length + i + 1}: first audio ${ms(m.first_audio_ms)}` });
        let prev = 0;
        for (const s of STAGES) {
          const v = m[s.key];
          if (v == null) continue;
          const seg = el(`div.h-seg.${s.cls}`);
          seg.style.height = `${(Math.max(0, v - prev) / top) * 100}%`;
          col.prepend(seg);
          prev = Math.max(prev, v);
        }
        return col;
      }),
    );
  }
}

/** A scrolling level meter on a canvas: one bar per 20–100 ms. */
export class Meter {
  constructor(canvas, color) {
    this.canvas = canvas;
    this.ctx = canvas.getContext('2d');
    this.color = color;
    this.levels = new Array(96).fill(0);
  }

  push(rms) {
    // Map RMS to 0..1 on a dB scale from -60 dBFS.
    const db = 20 * Math.log10(Math.max(rms, 1e-6));
    this.levels.push(Math.max(0, Math.min(1, (db + 60) / 60)));
    this.levels.shift();
  }

  draw() {
    const { width: w, height: h } = this.canvas;
    const c = this.ctx;
    c.clearRect(0, 0, w, h);
    const bw = w / this.levels.length;
    c.fillStyle = this.color;
    this.levels.forEach((v, i) => {
      const bh = Math.max(1, v * h);
      c.fillRect(i * bw, (h - bh) / 2, Math.max(1, bw - 1), bh);
    });
  }
}

/** The event log: both directions, filterable, capped. */
export class EventLog {
  constructor(list, count, filter, showAudio) {
    this.list = list;
    this.count = count;
    this.filter = filter;
    this.showAudio = showAudio;
    this.entries = [];
    this.t0 = performance.now();
    this.audioIn = 0;
    this.audioOut = 0;
    filter.addEventListener('input', () => this.render());
    showAudio.addEventListener('change', () => this.render());
  }

  clear() {
    this.entries = [];
    this.render();
  }

  add(dir, ev) {
    const isAudio = ev.type === 'input_audio_buffer.append' || ev.type === 'response.output_audio.delta';
    if (ev.type === 'input_audio_buffer.append') this.audioOut++;
    if (ev.type === 'response.output_audio.delta') this.audioIn++;
    const shown = { ...ev };
    if (typeof shown.audio === 'string') shown.audio = `<${Math.round((shown.audio.length * 3) / 4)} bytes>`;
    if (isAudio && typeof shown.delta === 'string') shown.delta = `<${Math.round((shown.delta.length * 3) / 4)} bytes>`;
    const entry = { t: (performance.now() - this.t0) / 1000, dir, type: ev.type || '?', isAudio, json: JSON.stringify(shown) };
    this.entries.push(entry);
    if (this.entries.length > 2000) this.entries.splice(0, this.entries.length - 1500);
    if (this.list.closest('details').open && this.visible(entry)) {
      this.list.append(this.row(entry));
      while (this.list.childElementCount > 400) this.list.firstChild.remove();
    }
    this.count.textContent = `${this.entries.length} events · ${this.audioOut} audio chunks sent, ${this.audioIn} received`;
  }

  visible(e) {
    if (e.isAudio && !this.showAudio.checked) return false;
    const f = this.filter.value.trim();
    return !f || e.type.includes(f) || e.json.includes(f);
  }

  row(e) {
    return el(
      `li.${e.dir === 'in' ? 'in' : 'out'}${e.type === 'error' ? '.err' : ''}`,
      {},
      el('span.t', { text: e.t.toFixed(2) }),
      el('span.dir', { text: e.dir === 'in' ? '↓' : '↑' }),
      el('span.type', { text: e.type }),
      el('code', { text: e.json.length > 600 ? e.json.slice(0, 600) + '…' : e.json }),
    );
  }

  render() {
    this.list.replaceChildren(...this.entries.filter((e) => this.visible(e)).slice(-400).map((e) => this.row(e)));
  }
}
