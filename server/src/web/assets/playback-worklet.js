// Agent playback with a small jitter buffer. PCM16 chunks arrive tagged with their
// conversation item; playback starts once `prebuffer` samples are queued (or the
// response's audio is complete) and re-buffers after an underrun, so a synthesizer
// running close to real time does not click. `flush` drops everything at once and
// answers how many samples of the item being played were actually played, which
// becomes `conversation.item.truncate`'s `audio_end_ms`. Every ~100 ms it reports
// counters, the output level and the samples it played (for the recording).
class ParleyPlayback extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const o = options.processorOptions || {};
    this.prebuffer = o.prebuffer || 1920;
    this.queue = [];
    this.buffered = 0;
    this.playing = false;
    this.ended = false;
    this.played = 0;
    this.playedByItem = new Map();
    this.item = null;
    this.underruns = 0;
    this.reportSamples = o.reportSamples || 2400;
    this.report = new Float32Array(this.reportSamples);
    this.reportN = 0;
    this.sumsq = 0;
    this.peak = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(m) {
    if (m.type === 'push') {
      const pcm = new Int16Array(m.pcm);
      const f = new Float32Array(pcm.length);
      for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 0x8000;
      this.queue.push({ samples: f, offset: 0, item: m.item });
      this.buffered += f.length;
      this.ended = false;
    } else if (m.type === 'end') {
      this.ended = true;
    } else if (m.type === 'flush') {
      const dropped = this.buffered;
      const item = this.item;
      this.queue = [];
      this.buffered = 0;
      this.playing = false;
      this.port.postMessage({ type: 'flushed', id: m.id, item, itemPlayed: item ? this.playedByItem.get(item) || 0 : 0, dropped, played: this.played });
    }
  }

  process(_inputs, outputs) {
    const out = outputs[0];
    const ch = out[0];
    if (!this.playing && this.buffered > 0 && (this.buffered >= this.prebuffer || this.ended)) this.playing = true;
    let i = 0;
    if (this.playing) {
      while (i < ch.length && this.queue.length) {
        const head = this.queue[0];
        const take = Math.min(ch.length - i, head.samples.length - head.offset);
        ch.set(head.samples.subarray(head.offset, head.offset + take), i);
        i += take;
        head.offset += take;
        this.buffered -= take;
        this.played += take;
        this.item = head.item;
        this.playedByItem.set(head.item, (this.playedByItem.get(head.item) || 0) + take);
        if (head.offset >= head.samples.length) this.queue.shift();
      }
      if (!this.queue.length) {
        if (!this.ended) this.underruns++;
        this.playing = false;
      }
    }
    for (let k = i; k < ch.length; k++) ch[k] = 0;
    for (let c = 1; c < out.length; c++) out[c].set(ch);
    for (let k = 0; k < ch.length; k++) {
      const s = ch[k];
      this.sumsq += s * s;
      const a = Math.abs(s);
      if (a > this.peak) this.peak = a;
      this.report[this.reportN++] = s;
      if (this.reportN === this.report.length) this.flushReport();
    }
    return true;
  }

  flushReport() {
    const samples = this.report;
    this.port.postMessage({
      type: 'tick',
      samples,
      rms: Math.sqrt(this.sumsq / samples.length),
      peak: this.peak,
      played: this.played,
      buffered: this.buffered,
      playing: this.playing || this.buffered > 0,
      item: this.item,
      itemPlayed: this.item ? this.playedByItem.get(this.item) || 0 : 0,
      underruns: this.underruns,
    }, [samples.buffer]);
    // `samples` was transferred (its length is 0 now): size the next one afresh.
    this.report = new Float32Array(this.reportSamples);
    this.reportN = 0;
    this.sumsq = 0;
    this.peak = 0;
  }
}

registerProcessor('parley-playback', ParleyPlayback);
