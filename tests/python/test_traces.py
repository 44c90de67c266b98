"""Traces over OTLP/HTTP: a real `parley serve` exports to a small OTLP receiver
here, whose requests are decoded with the OpenTelemetry project's own protobuf
definitions (`opentelemetry-proto`). One call has a spoken turn (speech-to-text)
and a typed pharmacy question (a tool call); the spans for the call, its turns
and each stage arrive, nested, with the turn's latency breakdown on it."""

import asyncio
import base64
import http.server
import json
import pathlib
import tempfile
import threading

import websockets
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from conftest import running_parley
from test_openai_sdk import espeak_pcm24k


class Receiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP trace receiver: keeps every span posted to /v1/traces."""

    def __init__(self):
        self.spans = []
        self.services = set()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
            self.send_response(404)
            self.end_headers()
            return
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        with self.server.lock:
            for rs in request.resource_spans:
                for attr in rs.resource.attributes:
                    if attr.key == "service.name":
                        self.server.services.add(attr.value.string_value)
                for ss in rs.scope_spans:
                    self.server.spans.extend(ss.spans)
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def attrs(span) -> dict:
    out = {}
    for a in span.attributes:
        v = a.value
        out[a.key] = v.string_value or v.int_value or v.double_value or v.bool_value
    return out


async def one_call(addr: str):
    """A typed pharmacy question that needs a tool, then a spoken question."""
    async with websockets.connect(f"ws://{addr}/v1/realtime", max_size=None) as ws:
        async def until(kind, timeout=240):
            async def run():
                while True:
                    event = json.loads(await ws.recv())
                    if event["type"] == kind:
                        return event
            return await asyncio.wait_for(run(), timeout)

        await until("session.created")
        await ws.send(json.dumps({
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text",
                     "text": "My member ID is 1001 and my date of birth is March 12, 1984. What orders do I have and what is their status?"}]},
        }))
        await ws.send(json.dumps({"type": "response.create"}))
        done = await until("response.done")
        assert done["response"]["status"] == "completed", done
        audio = espeak_pcm24k("What is the capital of France?") + bytes(24000 * 2 * 2)
        for i in range(0, len(audio), 4800):
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(audio[i : i + 4800]).decode()}))
            await asyncio.sleep(0.05)
        done = await until("response.done")
        assert done["response"]["status"] == "completed", done


def test_a_call_is_traced_with_its_turns_and_stages():
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    port = receiver.server_address[1]
    with tempfile.TemporaryDirectory() as d:
        config = pathlib.Path(d) / "parley.toml"
        config.write_text(
            f'[tools]\npharmacy_db = "{d}/pharmacy.sqlite"\n'
            f'[telemetry]\notlp_endpoint = "http://127.0.0.1:{port}"\nservice_name = "parley-test"\n'
        )
        with running_parley("--config", str(config)) as addr:
            asyncio.run(one_call(addr))
        # The server has stopped (SIGTERM): its last spans were flushed on the way out.
    receiver.shutdown()

    spans = receiver.spans
    by_name = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    assert receiver.services == {"parley-test"}, receiver.services
    for name in ["realtime", "call", "transcribe", "turn", "llm", "tts", "tool"]:
        assert name in by_name, f"no {name!r} span; got {sorted(by_name)}"

    (call,) = by_name["call"]
    ids = {s.span_id: s for s in spans}

    def ancestors(span):
        while span.parent_span_id and span.parent_span_id in ids:
            span = ids[span.parent_span_id]
            yield span

    # Every stage belongs to the call's trace, under the call span.
    for name in ["transcribe", "turn", "llm", "tts", "tool"]:
        for s in by_name[name]:
            assert s.trace_id == call.trace_id, name
            assert call.span_id in [a.span_id for a in ancestors(s)], f"{name} is not under the call"
    # LLM rounds, syntheses and tool calls are inside a turn.
    turn_ids = {t.span_id for t in by_name["turn"]}
    for name in ["llm", "tts", "tool"]:
        for s in by_name[name]:
            assert turn_ids & {a.span_id for a in ancestors(s)}, f"{name} span outside any turn"

    # Two turns, each with its synthesis figures; the spoken one also with
    # speech-to-text and the time from the end of speech to the first audio; the
    # typed one made the identity check.
    turns = [attrs(t) for t in sorted(by_name["turn"], key=lambda s: s.start_time_unix_nano)]
    assert len(turns) == 2, turns
    assert all(t.get("status") == "completed" for t in turns), turns
    assert all(t.get("first_tts_ms", 0) > 0 for t in turns), turns
    # The identity check is made by the agent from the caller's words, and when its
    # result carries a sentence that sentence is the answer: that turn may run no
    # generation at all. The other one does.
    assert any(t.get("prompt_tokens", 0) > 0 for t in turns), turns
    assert turns[0].get("tool_calls", 0) >= 1, turns
    spoken = [t for t in turns if "asr_ms" in t]
    assert len(spoken) == 1 and spoken[0]["asr_ms"] > 0 and spoken[0]["first_audio_ms"] > spoken[0]["asr_ms"], turns
    tools = [attrs(t) for t in by_name["tool"]]
    assert any(t.get("tool") == "verify_member" and t.get("ok") is True for t in tools), tools
    assert all(attrs(s).get("first_token_ms", 0) > 0 for s in by_name["llm"] if "first_token_ms" in attrs(s))
    # Spans have real durations.
    assert all(s.end_time_unix_nano > s.start_time_unix_nano for s in spans)
