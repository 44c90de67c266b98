// The page's audio: one AudioContext at the wire rate (24 kHz), the microphone
// through the capture worklet, the agent through the playback worklet, and a
// two-track recording (you on the left, the agent on the right) for download.

export const RATE = 24000;
const FRAME = 480; // 20 ms
const MAX_RECORD_SECONDS = 15 * 60;

/** Words for a getUserMedia / AudioContext failure. */
export function describeAudioError(e) {
  switch (e && e.name) {
    case 'NotAllowedError':
    case 'SecurityError':
      return 'Microphone permission was denied. Allow the microphone for this site (the icon in the address bar) and start again.';
    case 'NotFoundError':
    case 'OverconstrainedError':
      return 'No microphone was found (or the chosen one is gone). Plug one in or pick another.';
    case 'NotReadableError':
      return 'The microphone is in use by another program or could not be opened.';
    default:
      return `Audio could not start: ${e && e.message ? e.message : e}`;
  }
}

export class AudioEngine {
  /**
   * @param {{onCapture: (pcm: Int16Array, level: {rms:number, peak:number, raw:number}) => void,
   *          onTick: (tick: object) => void}} handlers
   */
  constructor(handlers) {
    this.handlers = handlers;
    this.ctx = null;
    this.stream = null;
    this.muted = false;
    this.captured = 0;
    this.flushSeq = 0;
    this.pendingFlush = new Map();
    this.recIn = [];
    this.recOut = [];
    this.recInN = 0;
    this.recOutN = 0;
    this.lastTick = { played: 0, buffered: 0, playing: false, underruns: 0 };
  }

  get running() {
    return !!this.ctx;
  }

  /** Opens the microphone (`deviceId`, or the default) and starts both worklets. */
  async start(deviceId) {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error('This browser gives no microphone access here. Open the page over HTTPS or on localhost.');
    }
    this.stream = await navigator.mediaDevices.getUserMedia({ audio: this.constraints(deviceId) });
    const ctx = new AudioContext({ sampleRate: RATE, latencyHint: 'interactive' });
    this.ctx = ctx;
    await ctx.audioWorklet.addModule('/demo/capture-worklet.js');
    await ctx.audioWorklet.addModule('/demo/playback-worklet.js');
    this.capture = new AudioWorkletNode(ctx, 'parley-capture', { numberOfInputs: 1, numberOfOutputs: 1, outputChannelCount: [1], processorOptions: { frame: FRAME } });
    this.capture.port.onmessage = (e) => this.onCaptured(e.data);
    // The capture node must be pulled by the graph; its output goes nowhere audible.
    this.sink = ctx.createGain();
    this.sink.gain.value = 0;
    this.capture.connect(this.sink).connect(ctx.destination);
    this.source = ctx.createMediaStreamSource(this.stream);
    this.source.connect(this.capture);
    this.playback = new AudioWorkletNode(ctx, 'parley-playback', { numberOfInputs: 0, numberOfOutputs: 1, outputChannelCount: [1], processorOptions: { prebuffer: RATE * 0.08 } });
    this.playback.port.onmessage = (e) => this.onPlayback(e.data);
    this.playback.connect(ctx.destination);
    await ctx.resume();
  }

  constraints(deviceId) {
    const c = { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true };
    if (deviceId) c.deviceId = { exact: deviceId };
    return c;
  }

  /** Moves capture to another microphone without touching playback. */
  async switchDevice(deviceId) {
    if (!this.ctx) return;
    const stream = await navigator.mediaDevices.getUserMedia({ audio: this.constraints(deviceId) });
    this.source.disconnect();
    this.stream.getTracks().forEach((t) => t.stop());
    this.stream = stream;
    this.source = this.ctx.createMediaStreamSource(stream);
    this.source.connect(this.capture);
  }

  /** The label of the microphone in use. */
  get deviceLabel() {
    const t = this.stream && this.stream.getAudioTracks()[0];
    return t ? t.label : '';
  }

  async stop() {
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    this.stream = null;
    if (this.ctx) await this.ctx.close().catch(() => {});
    this.ctx = null;
    for (const resolve of this.pendingFlush.values()) resolve({ item: null, itemPlayed: 0, dropped: 0 });
    this.pendingFlush.clear();
  }

  onCaptured({ pcm, rms, peak }) {
    const raw = rms;
    if (this.muted) {
      pcm.fill(0);
      rms = 0;
      peak = 0;
    }
    this.captured += pcm.length;
    if (this.recInN < MAX_RECORD_SECONDS * RATE) {
      this.recIn.push(pcm);
      this.recInN += pcm.length;
    }
    this.handlers.onCapture(pcm, { rms, peak, raw });
  }

  onPlayback(m) {
    if (m.type === 'tick') {
      this.lastTick = m;
      if (this.recOutN < MAX_RECORD_SECONDS * RATE) {
        this.recOut.push(m.samples);
        this.recOutN += m.samples.length;
      }
      this.handlers.onTick(m);
    } else if (m.type === 'flushed') {
      const resolve = this.pendingFlush.get(m.id);
      this.pendingFlush.delete(m.id);
      if (resolve) resolve(m);
    }
  }

  /** Queues agent audio (PCM16 bytes) of conversation item `item`. */
  push(item, bytes) {
    if (!this.playback) return;
    const buf = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + (bytes.byteLength & ~1));
    this.playback.port.postMessage({ type: 'push', item, pcm: buf }, [buf]);
  }

  /** The response's audio is complete: play out what is queued even if short. */
  end() {
    if (this.playback) this.playback.port.postMessage({ type: 'end' });
  }

  /**
   * Stops playback at once. Resolves with `{item, itemPlayed, dropped}`: the item
   * that was playing, how many of its samples were played, how many were dropped.
   */
  flush() {
    if (!this.playback) return Promise.resolve({ item: null, itemPlayed: 0, dropped: 0 });
    const id = ++this.flushSeq;
    return new Promise((resolve) => {
      this.pendingFlush.set(id, resolve);
      this.playback.port.postMessage({ type: 'flush', id });
    });
  }

  /** A stereo WAV of the call: you left, the agent right. */
  recordingWav() {
    const a = concatInt16(this.recIn, this.recInN);
    const b = this.recOut;
    const n = Math.max(a.length, this.recOutN);
    const data = new Int16Array(n * 2);
    for (let i = 0; i < a.length; i++) data[2 * i] = a[i];
    let j = 0;
    for (const chunk of b) {
      for (let k = 0; k < chunk.length; k++, j++) {
        const s = Math.max(-1, Math.min(1, chunk[k]));
        data[2 * j + 1] = s < 0 ? s * 0x8000 : s * 0x7fff;
      }
    }
    return wavBlob(data, 2, RATE);
  }

  get hasRecording() {
    return this.recInN > 0 || this.recOutN > 0;
  }
}

function concatInt16(chunks, n) {
  const out = new Int16Array(n);
  let o = 0;
  for (const c of chunks) {
    out.set(c, o);
    o += c.length;
  }
  return out;
}

function wavBlob(samples, channels, rate) {
  const header = new DataView(new ArrayBuffer(44));
  const bytes = samples.length * 2;
  const str = (off, s) => [...s].forEach((ch, i) => header.setUint8(off + i, ch.charCodeAt(0)));
  str(0, 'RIFF');
  header.setUint32(4, 36 + bytes, true);
  str(8, 'WAVE');
  str(12, 'fmt ');
  header.setUint32(16, 16, true);
  header.setUint16(20, 1, true);
  header.setUint16(22, channels, true);
  header.setUint32(24, rate, true);
  header.setUint32(28, rate * channels * 2, true);
  header.setUint16(32, channels * 2, true);
  header.setUint16(34, 16, true);
  str(36, 'data');
  header.setUint32(40, bytes, true);
  return new Blob([header, samples.buffer], { type: 'audio/wav' });
}

/** PCM16 bytes → base64, in slices small enough for `String.fromCharCode`. */
export function toBase64(bytes) {
  let s = '';
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

/** base64 → bytes. */
export function fromBase64(b64) {
  const s = atob(b64);
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}
