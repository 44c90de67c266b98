// A WebSocket over HTTP/2 (RFC 8441) client built on Node's own `http2` module:
// extended CONNECT with `:protocol: websocket`, then WebSocket frames on the stream.
// Usage: node rfc8441.js URL PATH [--accept-only]
//   Sends `{not json` and then a valid `session.update`; prints each server event as
//   one JSON line; exits 0 once it has seen session.created, an invalid_json error
//   and session.updated, 1 on any failure, 2 if the CONNECT is refused.
'use strict';
const http2 = require('node:http2');

const [url, path] = process.argv.slice(2);
const client = http2.connect(url, { rejectUnauthorized: false });
client.on('error', (e) => { console.error('connection error:', e.message); process.exit(1); });
setTimeout(() => { console.error('timed out'); process.exit(1); }, 30000).unref();

client.on('remoteSettings', (settings) => {
  if (!settings.enableConnectProtocol) { console.error('server does not advertise SETTINGS_ENABLE_CONNECT_PROTOCOL'); process.exit(1); }
});

function frame(opcode, payload) {
  // Client frames are masked (RFC 6455 5.3).
  const mask = Buffer.from([0x12, 0x34, 0x56, 0x78]);
  let head;
  if (payload.length < 126) { head = Buffer.from([0x80 | opcode, 0x80 | payload.length]); }
  else if (payload.length < 65536) { head = Buffer.alloc(4); head[0] = 0x80 | opcode; head[1] = 0x80 | 126; head.writeUInt16BE(payload.length, 2); }
  else { head = Buffer.alloc(10); head[0] = 0x80 | opcode; head[1] = 0x80 | 127; head.writeBigUInt64BE(BigInt(payload.length), 2); }
  const body = Buffer.from(payload);
  for (let i = 0; i < body.length; i++) body[i] ^= mask[i % 4];
  return Buffer.concat([head, mask, body]);
}

client.once('remoteSettings', () => {
  const stream = client.request({ ':method': 'CONNECT', ':protocol': 'websocket', ':path': path, ':scheme': url.startsWith('https') ? 'https' : 'http', 'sec-websocket-version': '13' });
  stream.on('response', (headers) => {
    if (headers[':status'] !== 200) { console.error('CONNECT answered', headers[':status']); process.exit(2); }
    if (process.argv[4] === '--accept-only') { console.log(JSON.stringify({ accepted: path })); client.destroy(); process.exit(0); }
    stream.write(frame(1, '{not json'));
    stream.write(frame(1, JSON.stringify({ type: 'session.update', session: { type: 'realtime', instructions: 'Be brief.' } })));
  });
  let buf = Buffer.alloc(0);
  const seen = new Set();
  stream.on('data', (chunk) => {
    buf = Buffer.concat([buf, chunk]);
    for (;;) {
      if (buf.length < 2) return;
      const opcode = buf[0] & 0x0f;
      let len = buf[1] & 0x7f, off = 2;
      if (len === 126) { if (buf.length < 4) return; len = buf.readUInt16BE(2); off = 4; }
      else if (len === 127) { if (buf.length < 10) return; len = Number(buf.readBigUInt64BE(2)); off = 10; }
      if (buf.length < off + len) return;
      const payload = buf.subarray(off, off + len);
      buf = buf.subarray(off + len);
      if (opcode !== 1) continue;
      const ev = JSON.parse(payload.toString('utf8'));
      console.log(JSON.stringify({ type: ev.type, code: ev.error ? ev.error.code : undefined }));
      if (ev.type === 'error' && ev.error.code === 'invalid_json') seen.add('invalid_json');
      if (ev.type === 'session.created' || ev.type === 'session.updated') seen.add(ev.type);
      if (seen.size === 3) {
        stream.end(frame(8, Buffer.from([0x03, 0xe8])));
        client.close(() => process.exit(0));
        return;
      }
    }
  });
  stream.on('error', (e) => { console.error('stream error:', e.message); process.exit(1); });
});
