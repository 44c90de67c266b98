// Microphone capture: the AudioContext runs at 24 kHz, so each render quantum is
// already at the wire rate. Samples are converted to PCM16 and posted in frames of
// `frame` samples (20 ms), with the frame's RMS and peak for the level meter.
class ParleyCapture extends AudioWorkletProcessor {
  constructor(options) {
    super();
    this.frame = (options.processorOptions && options.processorOptions.frame) || 480;
    this.buf = new Int16Array(this.frame);
    this.n = 0;
    this.sumsq = 0;
    this.peak = 0;
  }

  process(inputs) {
    const input = inputs[0];
    const ch = input && input[0];
    if (!ch) return true;
    for (let i = 0; i < ch.length; i++) {
      const s = Math.max(-1, Math.min(1, ch[i]));
      this.sumsq += s * s;
      const a = Math.abs(s);
      if (a > this.peak) this.peak = a;
      this.buf[this.n++] = s < 0 ? s * 0x8000 : s * 0x7fff;
      if (this.n === this.frame) {
        const pcm = this.buf;
        this.port.postMessage({ pcm, rms: Math.sqrt(this.sumsq / this.frame), peak: this.peak }, [pcm.buffer]);
        this.buf = new Int16Array(this.frame);
        this.n = 0;
        this.sumsq = 0;
        this.peak = 0;
      }
    }
    return true;
  }
}

registerProcessor('parley-capture', ParleyCapture);
