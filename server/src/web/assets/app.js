// Parley's demo page: a Realtime client in the browser. Wires the microphone and
// speaker (audio.js) to the WebSocket (realtime.js) and the views (ui.js).

import { AudioEngine, RATE, describeAudioError, fromBase64, toBase64 } from './audio.js';
import { RealtimeConnection, mintClientSecret, serverInfo } from './realtime.js';
import { EventLog, Latency, Meter, Transcript, el } from './ui.js';

const $ = (id) => document.getElementById(id);

// ---- test and debugging hook -------------------------------------------------
const hook = {
  state: 'idle',
  samplesCaptured: 0,
  samplesPlayed: 0,
  samplesReceived: 0,
  underruns: 0,
  sent: {},
  received: {},
  truncates: [],
  flushes: [],
  errors: [],
  pageErrors: [],
  toolCalls: [],
  metrics: [],
  micMuted: false,
  micQuietMs: 0,
  responding: false,
  setMicMuted: (m) => setMuted(!!m),
  start: () => start(),
  stop: () => stop('stopped by the page hook'),
  sendText: (t) => sendText(t),
};
window.__parley = hook;

window.addEventListener('error', (e) => {
  hook.pageErrors.push(String(e.message || e.error));
  showError(`Page error: ${e.message || e.error}`);
});
window.addEventListener('unhandledrejection', (e) => {
  hook.pageErrors.push(String(e.reason && e.reason.message ? e.reason.message : e.reason));
  showError(`Page error: ${e.reason && e.reason.message ? e.reason.message : e.reason}`);
});

// ---- views ----------------------------------------------------------------------
const transcript = new Transcript($('transcript'));
const latency = new Latency($('waterfall'), $('history'), $('latency-rows'));
const log = new EventLog($('log'), $('log-count'), $('log-filter'), $('log-audio'));
const meterIn = new Meter($('meter-in'), '#2f6fed');
const meterOut = new Meter($('meter-out'), '#13a07a');

const call = {
  conn: null,
  audio: null,
  session: null,
  startedAt: 0,
  response: null, // {id, item, status}
  itemResponse: new Map(), // assistant item → response id
  received: new Map(), // assistant item → samples received
  cut: new Set(), // responses already flushed for barge-in
  speaking: false,
  timer: 0,
  typedAt: 0, // when a typed message was sent (its reply has no speech timings)
  pageTimes: new Map(), // response → {start, audio} measured by the page
};

function setState(state, words) {
  hook.state = state;
  const s = $('state');
  s.className = `state ${state}`;
  s.textContent = words;
  const live = state === 'live';
  $('start').textContent = state === 'idle' || state === 'error' ? 'Start call' : 'Hang up';
  $('start').classList.toggle('danger', state !== 'idle' && state !== 'error');
  for (const id of ['mute', 'text-input', 'text-send', 'settings-apply']) $(id).disabled = !live;
}

function setTurn(words, cls) {
  const t = $('turn-state');
  t.textContent = words;
  t.className = `turn-state ${cls || ''}`;
}

function showError(message) {
  hook.errors.push(message);
  const item = el('div.error', {}, el('span', { text: message }), el('button.ghost.small', { text: 'dismiss', type: 'button' }));
  item.querySelector('button').addEventListener('click', () => item.remove());
  $('errors').append(item);
  while ($('errors').childElementCount > 4) $('errors').firstChild.remove();
}

function clearErrors() {
  $('errors').replaceChildren();
}

function setMuted(muted) {
  hook.micMuted = muted;
  if (call.audio) call.audio.muted = muted;
  $('mute').textContent = muted ? 'Unmute' : 'Mute';
  $('mute').setAttribute('aria-pressed', String(muted));
  $('mute').classList.toggle('on', muted);
}

function sessionInfo(rows) {
  $('session-info').replaceChildren(...rows.flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { text: v })]));
}

function refreshSessionInfo() {
  const s = call.session || {};
  const secs = call.startedAt ? Math.round((performance.now() - call.startedAt) / 1000) : 0;
  sessionInfo([
    ['status', hook.state],
    ['session', s.id || '—'],
    ['model', s.model || '—'],
    ['voice', (s.audio && s.audio.output && s.audio.output.voice) || '—'],
    ['microphone', (call.audio && call.audio.deviceLabel) || '—'],
    ['call time', `${Math.floor(secs / 60)}:${String(secs % 60).padStart(2, '0')}`],
    ['turns', String(latency.turns.length)],
    ['audio', `${(hook.samplesCaptured / RATE).toFixed(1)} s sent · ${(hook.samplesPlayed / RATE).toFixed(1)} s played`],
  ]);
}

// ---- settings --------------------------------------------------------------------
function fillSettings(s) {
  if (!s) return;
  $('set-instructions').value = s.instructions || '';
  const td = s.audio && s.audio.input ? s.audio.input.turn_detection : null;
  $('set-vad').checked = !!td;
  if (td) {
    if (td.silence_duration_ms != null) $('set-silence').value = td.silence_duration_ms;
    if (td.interrupt_response != null) $('set-interrupt').checked = !!td.interrupt_response;
    const i = td.interruption || {};
    if (i.min_pause_ms != null) $('set-min-pause').value = i.min_pause_ms;
    if (i.echo_guard != null) $('set-echo').checked = !!i.echo_guard;
  }
  $('set-tools').checked = s.tool_choice !== 'none';
}

function settingsUpdate() {
  const num = (id) => Number($(id).value);
  const td = $('set-vad').checked
    ? {
        type: 'server_vad',
        silence_duration_ms: num('set-silence'),
        interrupt_response: $('set-interrupt').checked,
        interruption: { min_pause_ms: num('set-min-pause'), echo_guard: $('set-echo').checked },
      }
    : null;
  return {
    type: 'session.update',
    session: {
      type: 'realtime',
      instructions: $('set-instructions').value,
      tool_choice: $('set-tools').checked ? 'auto' : 'none',
      audio: { input: { turn_detection: td } },
    },
  };
}

// ---- the call ----------------------------------------------------------------------
function send(ev) {
  return call.conn ? call.conn.send(ev) : false;
}

function sendText(text) {
  if (!text || !call.conn || !call.conn.open) return false;
  call.typedAt = performance.now();
  send({ type: 'conversation.item.create', item: { type: 'message', role: 'user', content: [{ type: 'input_text', text }] } });
  send({ type: 'response.create' });
  return true;
}

async function apiKey() {
  const remembered = sessionStorage.getItem('parley-api-key');
  const typed = $('api-key').value.trim();
  return typed || remembered || '';
}

async function start() {
  if (hook.state === 'connecting' || hook.state === 'live') return;
  clearErrors();
  setState('connecting', 'Connecting…');
  let secret = null;
  try {
    const info = await serverInfo();
    if (!info.ready) throw new Error('The server is still loading its models. Try again in a few seconds.');
    if (info.auth_required) {
      const key = await apiKey();
      if (!key) {
        $('key-panel').hidden = false;
        $('api-key').focus();
        setState('idle', 'API key needed');
        return;
      }
      try {
        secret = (await mintClientSecret(key)).value;
      } catch (e) {
        if (e.badKey) {
          sessionStorage.removeItem('parley-api-key');
          $('key-panel').hidden = false;
        }
        throw e;
      }
      if ($('remember-key').checked) sessionStorage.setItem('parley-api-key', key);
      $('key-panel').hidden = true;
    }
  } catch (e) {
    setState('error', 'Not connected');
    showError(e.message);
    return;
  }

  const audio = new AudioEngine({ onCapture, onTick });
  audio.muted = hook.micMuted;
  try {
    await audio.start($('mic-select').value);
  } catch (e) {
    await audio.stop();
    setState('error', 'Microphone unavailable');
    showError(describeAudioError(e));
    return;
  }
  call.audio = audio;
  listDevices();

  transcript.reset();
  latency.reset();
  call.itemResponse.clear();
  call.received.clear();
  call.cut.clear();
  call.response = null;
  const conn = new RealtimeConnection({ onEvent, onSent: (ev) => countSent(ev), onClose });
  call.conn = conn;
  try {
    const created = await conn.connect(secret);
    call.session = created.session;
  } catch (e) {
    call.conn = null;
    await audio.stop();
    call.audio = null;
    setState('error', 'Not connected');
    showError(e.message);
    return;
  }
  // The page speaks 24 kHz PCM16 both ways (the protocol's default, said explicitly).
  send({ type: 'session.update', session: { type: 'realtime', audio: { input: { format: { type: 'audio/pcm', rate: RATE } }, output: { format: { type: 'audio/pcm', rate: RATE } } } } });
  call.startedAt = performance.now();
  setState('live', 'Live');
  setTurn('Listening', 'listening');
  $('download-transcript').disabled = false;
  $('download-recording').disabled = false;
  call.timer = setInterval(refreshSessionInfo, 1000);
  refreshSessionInfo();
}

async function stop(reason) {
  const conn = call.conn;
  call.conn = null;
  if (conn) conn.close();
  if (call.audio) await call.audio.stop();
  clearInterval(call.timer);
  setState('idle', reason ? `Call ended: ${reason}` : 'Not connected');
  setTurn('', '');
  refreshSessionInfo();
}

function onClose({ code, reason, opened }) {
  if (!opened) return; // the connect promise reports it
  if (call.conn) {
    // Closed by the server, not by us.
    call.conn = null;
    const words = reason || (code === 1000 ? 'the server ended the call' : `the connection was lost (code ${code})`);
    showError(`The call ended: ${words}.`);
    stop(words);
  }
}

function countSent(ev) {
  hook.sent[ev.type] = (hook.sent[ev.type] || 0) + 1;
  log.add('out', ev);
}

function onCapture(pcm, level) {
  hook.samplesCaptured += pcm.length;
  // How long the microphone itself (before the mute switch) has been quiet.
  hook.micQuietMs = level.raw < 0.01 ? (hook.micQuietMs || 0) + (pcm.length / RATE) * 1000 : 0;
  meterIn.push(level.rms);
  if (call.conn && call.conn.open) {
    send({ type: 'input_audio_buffer.append', audio: toBase64(new Uint8Array(pcm.buffer, pcm.byteOffset, pcm.byteLength)) });
  }
}

function onTick(t) {
  hook.samplesPlayed = t.played;
  hook.underruns = t.underruns;
  meterOut.push(t.rms);
  if (call.conn && call.response && !t.playing && call.speaking) {
    call.speaking = false;
    setTurn('Listening', 'listening');
  } else if (t.playing && !call.speaking) {
    call.speaking = true;
    setTurn('Agent speaking', 'speaking');
  }
  $('audio-stats').textContent = `played ${(t.played / RATE).toFixed(1)} s · buffered ${Math.round((t.buffered / RATE) * 1000)} ms · underruns ${t.underruns}`;
}

/** Records when the page first saw a reply's `kind` (audio) arrive. */
function pageTime(responseId, kind) {
  const p = call.pageTimes.get(responseId);
  if (p && p[kind] == null) p[kind] = performance.now();
}

/**
 * Barge-in: stop playback at once, tell the server how much of the reply was heard.
 */
async function bargeIn(responseId, reason) {
  if (!call.audio || call.cut.has(responseId)) return;
  call.cut.add(responseId);
  const r = await call.audio.flush();
  const item = r.item && call.itemResponse.get(r.item) === responseId ? r.item : null;
  const playedMs = item ? Math.floor((r.itemPlayed / RATE) * 1000) : 0;
  hook.flushes.push({ reason, response: responseId, item, playedMs, dropped: r.dropped });
  if (item) {
    const ev = { type: 'conversation.item.truncate', item_id: item, content_index: 0, audio_end_ms: playedMs };
    send(ev);
    hook.truncates.push({ item_id: item, audio_end_ms: playedMs, reason });
    const received = call.received.get(item) || 1;
    transcript.agentInterrupted(item, r.itemPlayed / received, playedMs);
  } else {
    // Nothing of this reply was played yet: cut its text entirely.
    for (const [it, resp] of call.itemResponse) if (resp === responseId) transcript.agentInterrupted(it, 0, 0);
  }
  call.speaking = false;
  setTurn('You are speaking', 'user');
}

function onEvent(ev) {
  hook.received[ev.type] = (hook.received[ev.type] || 0) + 1;
  log.add('in', ev);
  switch (ev.type) {
    case 'session.created':
    case 'session.updated':
      call.session = ev.session;
      fillSettings(ev.session);
      if (ev.type === 'session.updated') $('settings-note').textContent = 'applied';
      break;
    case 'input_audio_buffer.speech_started':
      transcript.userSpeaking(ev.item_id);
      if (!call.speaking) setTurn('You are speaking', 'user');
      else setTurn('You are talking over the agent', 'overlap');
      break;
    case 'input_audio_buffer.speech_stopped':
      if (!call.speaking) setTurn('Thinking…', 'thinking');
      break;
    case 'conversation.item.input_audio_transcription.delta':
      transcript.userPartial(ev.item_id, ev.delta || '');
      break;
    case 'conversation.item.input_audio_transcription.completed':
      transcript.userFinal(ev.item_id, ev.transcript || '');
      break;
    case 'conversation.item.added': {
      const item = ev.item || {};
      if (item.type === 'message' && item.role === 'user') {
        const text = (item.content || []).filter((c) => c.type === 'input_text').map((c) => c.text).join(' ');
        if (text) transcript.userFinal(item.id, text, true);
      } else if (item.type === 'function_call_output') {
        transcript.toolResult(item.call_id, item.output || '');
        const t = hook.toolCalls.find((c) => c.call_id === item.call_id);
        if (t) t.output = item.output;
      }
      break;
    }
    case 'response.created':
      call.response = { id: ev.response.id };
      hook.responding = true;
      if (call.typedAt) call.pageTimes.set(ev.response.id, { start: call.typedAt });
      call.typedAt = 0;
      if (!call.speaking) setTurn('Thinking…', 'thinking');
      break;
    case 'response.output_item.added':
      if (ev.item && ev.item.type === 'message') {
        call.itemResponse.set(ev.item.id, ev.response_id);
        transcript.agentStart(ev.item.id);
      }
      break;
    case 'response.output_audio_transcript.delta':
      transcript.agentDelta(ev.item_id, ev.delta || '');
      break;
    case 'response.output_audio.delta': {
      if (call.cut.has(ev.response_id)) break;
      pageTime(ev.response_id, 'audio');
      const bytes = fromBase64(ev.delta || '');
      const n = bytes.length >> 1;
      hook.samplesReceived += n;
      call.received.set(ev.item_id, (call.received.get(ev.item_id) || 0) + n);
      call.audio && call.audio.push(ev.item_id, bytes);
      break;
    }
    case 'response.output_audio.done':
      call.audio && call.audio.end();
      break;
    case 'response.function_call_arguments.done':
      transcript.toolCall(ev.call_id, ev.name, ev.arguments, 'server');
      hook.toolCalls.push({ call_id: ev.call_id, name: ev.name, arguments: ev.arguments });
      break;
    case 'response.output_item.done':
      if (ev.item && ev.item.type === 'function_call' && ev.parley_runs_on === 'client') {
        const card = document.querySelector(`.tool-card[data-call="${CSS.escape(ev.item.call_id)}"] .badge`);
        if (card) card.textContent = 'client';
      }
      break;
    case 'output_audio_buffer.cleared':
      bargeIn(ev.response_id, 'output_audio_buffer.cleared');
      break;
    case 'response.done': {
      const r = ev.response || {};
      hook.responding = false;
      if (r.status === 'cancelled') bargeIn(r.id, 'response cancelled');
      for (const out of r.output || []) {
        if (out.type === 'message') {
          const part = (out.content || [])[0] || {};
          transcript.agentDone(out.id, r.status, part.transcript);
        }
      }
      if (r.status === 'failed') showError('The agent failed to answer this turn (see the server log).');
      if (!call.speaking) setTurn('Listening', 'listening');
      break;
    }
    case 'parley.turn.metrics': {
      let m = ev.metrics || {};
      hook.metrics.push(m);
      // A typed turn has no speech timings: show what the page measured from Enter.
      const p = call.pageTimes.get(m.response_id);
      if (p && m.endpoint_ms == null && m.first_token_ms == null && m.first_audio_ms == null) {
        m = { ...m, first_audio_ms: p.audio != null ? p.audio - p.start : null, page_measured: true };
      }
      latency.add(m);
      break;
    }
    case 'error': {
      const e = ev.error || {};
      showError(`Server error${e.code ? ` (${e.code})` : ''}: ${e.message || 'unknown'}`);
      break;
    }
    default:
      break;
  }
}

// ---- devices ---------------------------------------------------------------------
async function listDevices() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.enumerateDevices) return;
  const select = $('mic-select');
  const current = select.value;
  const devices = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === 'audioinput');
  select.replaceChildren(
    el('option', { value: '', text: 'Default microphone' }),
    ...devices.filter((d) => d.deviceId && d.deviceId !== 'default').map((d, i) => el('option', { value: d.deviceId, text: d.label || `Microphone ${i + 1}` })),
  );
  select.value = [...select.options].some((o) => o.value === current) ? current : '';
}

// ---- wiring ------------------------------------------------------------------------
function download(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = el('a', { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function stamp() {
  return new Date().toISOString().replace(/[:.]/g, '-').slice(0, 19);
}

function wire() {
  $('start').addEventListener('click', () => (hook.state === 'live' || hook.state === 'connecting' ? stop() : start()));
  $('mute').addEventListener('click', () => setMuted(!hook.micMuted));
  $('key-form').addEventListener('submit', (e) => {
    e.preventDefault();
    start();
  });
  $('text-form').addEventListener('submit', (e) => {
    e.preventDefault();
    if (sendText($('text-input').value.trim())) $('text-input').value = '';
  });
  $('settings-form').addEventListener('submit', (e) => {
    e.preventDefault();
    $('settings-note').textContent = 'sending…';
    send(settingsUpdate());
  });
  $('mic-select').addEventListener('change', async () => {
    if (!call.audio || !call.audio.running) return;
    try {
      await call.audio.switchDevice($('mic-select').value);
      refreshSessionInfo();
    } catch (e) {
      showError(describeAudioError(e));
    }
  });
  $('download-transcript').addEventListener('click', () => download(new Blob([transcript.text()], { type: 'text/plain' }), `parley-transcript-${stamp()}.txt`));
  $('download-recording').addEventListener('click', () => {
    if (call.audio && call.audio.hasRecording) download(call.audio.recordingWav(), `parley-call-${stamp()}.wav`);
    else showError('Nothing recorded yet.');
  });
  $('log-clear').addEventListener('click', () => log.clear());
  $('log-panel').addEventListener('toggle', () => log.render());
  navigator.mediaDevices && navigator.mediaDevices.addEventListener && navigator.mediaDevices.addEventListener('devicechange', listDevices);
  const frame = () => {
    meterIn.draw();
    meterOut.draw();
    requestAnimationFrame(frame);
  };
  requestAnimationFrame(frame);
  setState('idle', 'Not connected');
  listDevices().catch(() => {});
  serverInfo()
    .then((info) => {
      if (info.auth_required && !sessionStorage.getItem('parley-api-key')) $('key-panel').hidden = false;
      sessionInfo([['status', info.ready ? 'ready' : 'loading models'], ['server', `parley ${info.version}`], ['auth', info.auth_required ? 'API key needed' : 'open']]);
    })
    .catch((e) => showError(e.message));
  hook.ready = true;
}

wire();
