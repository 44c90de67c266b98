// A full-duplex client of `POST /v1/stream` built on Node's own `http2` module: one
// HTTP/2 stream is one call, NDJSON Realtime events both ways.
// Usage: node stream.js URL MODE PCM [OVERSIZED_BYTES]
//   PCM: raw PCM16 little-endian mono 24 kHz speech.
//   MODE `call`: sends a malformed line and an oversized line, then the speech in real
//     time (20 ms appends) and silence until `response.done`, all on an open request
//     body; then ends the body and waits for the server to end the response. Prints a
//     JSON summary on the last line; exits 0 if the call went that way, 1 otherwise.
//   MODE `reset`: streams the speech and resets the stream (CANCEL) once the server
//     heard speech start; exits 0.
'use strict';
const http2 = require('node:http2');
const fs = require('node:fs');

const [url, mode, pcmPath, oversized] = process.argv.slice(2);
const pcm = fs.readFileSync(pcmPath);
const CHUNK = 24000 * 2 / 50; // 20 ms of PCM16 at 24 kHz
const fail = (m) => { console.error(m); process.exit(1); };
setTimeout(() => fail('timed out'), 150000).unref();

const client = http2.connect(url, { rejectUnauthorized: false });
client.on('error', (e) => fail('connection error: ' + e.message));
const stream = client.request({ ':method': 'POST', ':path': '/v1/stream', 'content-type': 'application/x-ndjson' });
const send = (ev) => stream.write(JSON.stringify(ev) + '\n');

const summary = { errors: [], transcript: '', audio_deltas: 0, done_before_body_end: false, response_ended_after_body: false, first_event_before_body_end: false };
let bodyEnded = false;
let sent = 0;
let ticker = null;

stream.on('response', (headers) => {
  if (headers[':status'] !== 200) fail('answered ' + headers[':status']);
  if (!String(headers['content-type']).startsWith('application/x-ndjson')) fail('content-type ' + headers['content-type']);
});

if (mode === 'call') {
  stream.write('{not json\n');
  // An append whose audio field makes the line longer than the server's limit.
  const n = Number(oversized || 600000);
  stream.write('{"type":"input_audio_buffer.append","audio":"' + 'A'.repeat(n) + '"}\n');
}
send({ type: 'session.update', session: { type: 'realtime', instructions: 'Answer in one short sentence.' } });

// The speech in real time, then silence, until the reply is done (or the stream reset).
ticker = setInterval(() => {
  let chunk;
  if (sent < pcm.length) { chunk = pcm.subarray(sent, Math.min(sent + CHUNK, pcm.length)); }
  else { chunk = Buffer.alloc(CHUNK); }
  sent += CHUNK;
  send({ type: 'input_audio_buffer.append', audio: chunk.toString('base64') });
}, 20);

let buf = '';
stream.setEncoding('utf8');
stream.on('data', (data) => {
  buf += data;
  let i;
  while ((i = buf.indexOf('\n')) >= 0) {
    const line = buf.slice(0, i);
    buf = buf.slice(i + 1);
    if (!line.trim()) continue;
    const ev = JSON.parse(line);
    if (!bodyEnded) summary.first_event_before_body_end = true;
    if (ev.type === 'error') summary.errors.push(ev.error.code);
    if (ev.type === 'conversation.item.input_audio_transcription.completed') summary.transcript += ev.transcript + ' ';
    if (ev.type === 'response.output_audio.delta') summary.audio_deltas += 1;
    if (ev.type === 'input_audio_buffer.speech_started' && mode === 'reset') {
      clearInterval(ticker);
      // Mid-call: a few more appends, then reset the stream.
      setTimeout(() => {
        stream.close(http2.constants.NGHTTP2_CANCEL);
        client.close(() => { console.log(JSON.stringify({ reset: true })); process.exit(0); });
      }, 300);
    }
    if (ev.type === 'response.done' && mode === 'call') {
      summary.done_before_body_end = !bodyEnded;
      summary.said = ev.response.output && ev.response.output[0] && ev.response.output[0].content ? ev.response.output[0].content[0].transcript : '';
      clearInterval(ticker);
      // The body was open all along; end it now: the server ends the response.
      bodyEnded = true;
      stream.end();
    }
  }
});
stream.on('end', () => {
  if (mode !== 'call') return;
  summary.response_ended_after_body = bodyEnded;
  console.log(JSON.stringify(summary));
  client.close(() => process.exit(bodyEnded ? 0 : 1));
});
stream.on('error', (e) => { if (mode !== 'reset') fail('stream error: ' + e.message); });
