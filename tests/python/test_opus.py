"""Opus on the Realtime WebSocket against decoders and encoders that are not
Parley's: the question is encoded by FFmpeg's libopus wrapper (PyAV), one packet
per append, and the reply is decoded by FFmpeg's own native Opus decoder, then
heard back through the server's speech-to-text."""

import array
import asyncio
import base64
import json
import math
import subprocess
import tempfile
import wave

import av
import websockets

RATE = 48000
PACKET = 960  # 20 ms at 48 kHz


def espeak_pcm48k(text: str) -> bytes:
    """PCM16 mono 48 kHz of espeak-ng saying `text`, resampled by sox."""
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", f"{d}/a.wav", text], check=True)
        subprocess.run(["sox", f"{d}/a.wav", "-r", str(RATE), "-c", "1", "-b", "16", f"{d}/b.wav"], check=True)
        with wave.open(f"{d}/b.wav") as w:
            return w.readframes(w.getnframes())


def libopus_packets(pcm: bytes) -> list[bytes]:
    """20 ms Opus packets of PCM16 48 kHz mono, from FFmpeg's libopus encoder."""
    enc = av.CodecContext.create("libopus", "w")
    enc.sample_rate = RATE
    enc.layout = "mono"
    enc.format = "s16"
    enc.bit_rate = 32000
    enc.open()
    assert enc.frame_size == PACKET
    packets = []
    step = PACKET * 2
    for i in range(0, len(pcm), step):
        chunk = pcm[i : i + step].ljust(step, b"\0")
        frame = av.AudioFrame(format="s16", layout="mono", samples=PACKET)
        frame.sample_rate = RATE
        frame.pts = i // 2
        frame.planes[0].update(chunk)
        packets += [bytes(p) for p in enc.encode(frame)]
    packets += [bytes(p) for p in enc.encode(None)]
    return packets


def ffmpeg_decode(packets: list[bytes]) -> list:
    """Decodes packets with FFmpeg's native Opus decoder (not libopus): audio frames."""
    dec = av.CodecContext.create("opus", "r")
    dec.sample_rate = RATE
    dec.layout = "mono"
    frames = []
    for p in packets:
        frames += dec.decode(av.Packet(p))
    return frames


def frames_to_pcm24k(frames) -> bytes:
    """The decoded frames as PCM16 mono 24 kHz (FFmpeg's resampler), for the ASR."""
    resampler = av.AudioResampler(format="s16", layout="mono", rate=24000)
    out = bytearray()
    for frame in list(frames) + [None]:
        for f in resampler.resample(frame):
            out += bytes(f.planes[0])[: f.samples * 2]
    return bytes(out)


async def recv_until(ws, kind: str, events: list, timeout: float = 180):
    async def run():
        async for msg in ws:
            event = json.loads(msg)
            events.append(event)
            if event["type"] == kind:
                return event
    return await asyncio.wait_for(run(), timeout)


async def send(ws, event: dict):
    await ws.send(json.dumps(event))


async def transcribe_pcm24k(addr: str, pcm: bytes) -> str:
    """The server's own speech-to-text of PCM16 24 kHz, turn detection off."""
    async with websockets.connect(f"ws://{addr}/v1/realtime", max_size=None) as ws:
        events = []
        await recv_until(ws, "session.created", events, 10)
        await send(ws, {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": None}}}})
        await recv_until(ws, "session.updated", events, 10)
        for i in range(0, len(pcm), 48000):
            await send(ws, {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + 48000]).decode()})
        await send(ws, {"type": "input_audio_buffer.commit"})
        done = await recv_until(ws, "conversation.item.input_audio_transcription.completed", events, 60)
        return done["transcript"]


def test_opus_in_and_out_with_ffmpeg_codecs(server):
    async def main():
        question = espeak_pcm48k("What is the capital of Germany?") + b"\0" * (RATE * 2 * 3 // 2)
        packets = libopus_packets(question)
        events = []
        async with websockets.connect(f"ws://{server}/v1/realtime", max_size=None) as ws:
            await recv_until(ws, "session.created", events, 10)
            await send(ws, {"type": "session.update", "session": {"type": "realtime", "audio": {
                "input": {"format": {"type": "audio/opus"}}, "output": {"format": {"type": "audio/opus"}}}}})
            updated = await recv_until(ws, "session.updated", events, 10)
            assert updated["session"]["audio"]["output"]["format"]["type"] == "audio/opus", updated

            async def reader():
                return await recv_until(ws, "response.done", events, 240)
            done_task = asyncio.create_task(reader())
            for packet in packets:  # one packet per append, in real time
                await send(ws, {"type": "input_audio_buffer.append", "audio": base64.b64encode(packet).decode()})
                await asyncio.sleep(0.02)
                if done_task.done():
                    break
            done = await done_task

        heard = " ".join(e["transcript"] for e in events if e["type"] == "conversation.item.input_audio_transcription.completed").lower()
        assert "capital" in heard and "germany" in heard, heard
        assert done["response"]["status"] == "completed", done
        said = done["response"]["output"][0]["content"][0]["transcript"]
        assert "berlin" in said.lower(), said

        reply = [base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta"]
        frames = ffmpeg_decode(reply)
        samples = sum(f.samples for f in frames)
        # One 20 ms packet per delta; a spoken sentence lasts seconds, not minutes.
        assert samples == PACKET * len(reply), (samples, len(reply))
        assert RATE // 2 < samples < RATE * 60, f"{samples / RATE:.2f} s of reply"
        floats = array.array("f")
        for f in frames:
            assert f.format.name == "fltp", f.format.name
            floats.frombytes(bytes(f.planes[0])[: f.samples * 4])  # fltp, mono
        rms = math.sqrt(sum(x * x for x in floats) / len(floats))
        assert rms > 0.01, f"the reply decodes to near silence (rms {rms})"

        back = await transcribe_pcm24k(server, frames_to_pcm24k(frames))
        assert "berlin" in back.lower(), f"FFmpeg's decoding of the reply was heard as {back!r}; the agent said {said!r}"

    asyncio.run(main())
