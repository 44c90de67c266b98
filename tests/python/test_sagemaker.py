"""Amazon SageMaker's bidirectional-streaming container contract, from the sidecar's
side, with the `websockets` client: /ping (GET and POST), the WebSocket at
/invocations-bidirectional-stream accepted within 250 ms, text, binary and fragmented
messages, a JSON event in a binary frame, ping replies, a close code when a call
cannot start, and a spoken question answered over binary audio frames.

One server for the file, in SageMaker mode (`parley serve --sagemaker`), with room for
two calls so that a third is refused."""

import asyncio
import base64
import json
import subprocess
import time
import urllib.request

import pytest
import websockets

from conftest import running_parley

RATE = 24_000
CHUNK = RATE * 2 // 50  # 20 ms of PCM16


@pytest.fixture(scope="module")
def sm():
    """A SageMaker-mode server; records what /ping said while the models loaded."""
    while_loading = set()

    def healthy(addr):
        status = ping(addr, "GET")[0]
        while_loading.add(status)
        return status == 200

    with running_parley("--max-calls", "2", env={"PARLEY_SAGEMAKER": "true"}, ready=healthy) as addr:
        while_loading.discard(200)
        yield {"addr": addr, "while_loading": while_loading}


def ping(addr, method):
    """(status, seconds) of one /ping."""
    started = time.monotonic()
    req = urllib.request.Request(f"http://{addr}/ping", method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return r.status, time.monotonic() - started
    except urllib.error.HTTPError as e:
        return e.code, time.monotonic() - started
    except OSError:
        return None, time.monotonic() - started


def calls_active(addr):
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=2) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("parley_calls_active "):
                return float(line.split()[1])
    raise AssertionError("no parley_calls_active")


def wait_calls(addr, want=0, within=20):
    deadline = time.time() + within
    while calls_active(addr) != want:
        assert time.time() < deadline, f"calls active did not reach {want}"
        time.sleep(0.1)


def url(addr):
    return f"ws://{addr}/invocations-bidirectional-stream"


async def next_event(ws, kind, timeout=30, seen=None):
    """Events until one of type `kind` (every event goes into `seen`)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
        assert isinstance(msg, str), "server events are text frames"
        ev = json.loads(msg)
        if seen is not None:
            seen.append(ev)
        if ev["type"] == kind:
            return ev


def test_ping_answers_get_and_post_fast(sm):
    for method in ("GET", "POST"):
        status, took = ping(sm["addr"], method)
        assert status == 200, method
        assert took < 0.5, f"{method} /ping took {took:.3f} s"
    # Before the models were in, /ping said so (or the fixture found them loaded at once).
    assert sm["while_loading"] <= {503, None}


def test_text_binary_and_fragmented_messages_and_ping_replies(sm):
    async def run():
        started = time.monotonic()
        async with websockets.connect(url(sm["addr"]), open_timeout=5) as ws:
            accepted = time.monotonic() - started
            assert accepted < 0.25, f"accepted after {accepted:.3f} s"
            await next_event(ws, "session.created")
            # A text frame: a client event.
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "Be brief."}}))
            ev = await next_event(ws, "session.updated")
            assert ev["session"]["instructions"] == "Be brief."
            # A binary frame holding a JSON event (SageMaker's untyped payload parts).
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "Binary."}}).encode())
            ev = await next_event(ws, "session.updated")
            assert ev["session"]["instructions"] == "Binary."
            # A fragmented text message (PARTIAL parts completed by a COMPLETE one).
            text = json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "Fragmented."}})
            await ws.send([text[:10], text[10:30], text[30:]])
            ev = await next_event(ws, "session.updated")
            assert ev["session"]["instructions"] == "Fragmented."
            # A malformed text event: an error event, and the call goes on.
            await ws.send("{not json")
            ev = await next_event(ws, "error")
            assert ev["error"]["code"] == "invalid_json"
            # Binary audio, one frame and one fragmented message: not errors.
            await ws.send(bytes(CHUNK))
            await ws.send([bytes(CHUNK // 2), bytes(CHUNK // 2)])
            # Pings are answered.
            for _ in range(3):
                pong = await ws.ping()
                await asyncio.wait_for(pong, 2)
            # Still one working call: a last update answered, no error on the audio.
            seen = []
            await ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "Done."}}))
            await next_event(ws, "session.updated", seen=seen)
            assert not [e for e in seen if e["type"] == "error"], seen

    asyncio.run(run())
    wait_calls(sm["addr"])


def speech_pcm(text):
    """PCM16 24 kHz mono speech from espeak-ng, resampled by sox."""
    wav = subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "--stdout", text], check=True, capture_output=True).stdout
    return subprocess.run(
        ["sox", "-t", "wav", "-", "-t", "raw", "-r", str(RATE), "-e", "signed", "-b", "16", "-c", "1", "-"],
        input=wav, check=True, capture_output=True,
    ).stdout


def test_a_spoken_question_in_binary_audio_frames_is_answered(sm):
    pcm = speech_pcm("What is the capital of Germany?")

    async def run():
        async with websockets.connect(url(sm["addr"])) as ws:
            done = asyncio.Event()

            async def speak():
                sent = 0
                # The speech in real time, then silence until the reply is done.
                while not done.is_set():
                    chunk = pcm[sent:sent + CHUNK] if sent < len(pcm) else bytes(CHUNK)
                    sent += CHUNK
                    # Every fifth chunk as a fragmented message.
                    await ws.send([chunk[:CHUNK // 2], chunk[CHUNK // 2:]] if sent // CHUNK % 5 == 0 else chunk)
                    await asyncio.sleep(0.02)

            speaker = asyncio.create_task(speak())
            seen = []
            try:
                reply = await next_event(ws, "response.done", timeout=150, seen=seen)
            finally:
                done.set()
                await speaker
            heard = " ".join(e["transcript"] for e in seen if e["type"] == "conversation.item.input_audio_transcription.completed").lower()
            assert "capital" in heard and "germany" in heard, heard
            audio = b"".join(base64.b64decode(e["delta"]) for e in seen if e["type"] == "response.output_audio.delta")
            assert len(audio) > RATE, "less than half a second of spoken answer"
            said = reply["response"]["output"][0]["content"][0]["transcript"].lower()
            assert "berlin" in said, said

    asyncio.run(run())
    wait_calls(sm["addr"])


def test_a_call_that_cannot_start_is_closed_with_a_code_and_reason(sm):
    wait_calls(sm["addr"])

    async def run():
        async with websockets.connect(url(sm["addr"])) as a, websockets.connect(url(sm["addr"])) as b:
            await next_event(a, "session.created")
            await next_event(b, "session.created")
            # The server's limit is two calls: the third is accepted, then closed.
            async with websockets.connect(url(sm["addr"])) as c:
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await asyncio.wait_for(c.recv(), 5)
                assert closed.value.rcvd is not None, "no close frame"
                assert closed.value.rcvd.code == 1013, closed.value.rcvd
                assert "limit" in closed.value.rcvd.reason, closed.value.rcvd

    asyncio.run(run())
    wait_calls(sm["addr"])
