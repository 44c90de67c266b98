"""The official `openai` SDK's realtime client against Parley, unchanged but for the
base URL: a typed question gets a spoken answer, and audio streamed through the SDK
is transcribed."""

import asyncio
import base64
import subprocess
import tempfile
import wave

from openai import AsyncOpenAI


def espeak_pcm24k(text: str) -> bytes:
    """PCM16 mono 24 kHz of espeak-ng saying `text`, with sox doing the resampling."""
    with tempfile.TemporaryDirectory() as d:
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", f"{d}/a.wav", text], check=True)
        subprocess.run(["sox", f"{d}/a.wav", "-r", "24000", "-c", "1", "-b", "16", f"{d}/b.wav"], check=True)
        with wave.open(f"{d}/b.wav") as w:
            return w.readframes(w.getnframes())


def client(addr: str) -> AsyncOpenAI:
    return AsyncOpenAI(api_key="not-needed", base_url=f"http://{addr}/v1")


async def collect_until_done(conn, timeout=180):
    events = []
    async def run():
        async for event in conn:
            events.append(event)
            if event.type == "response.done":
                return
    await asyncio.wait_for(run(), timeout)
    return events


def test_text_question_gets_spoken_answer(server):
    async def main():
        async with client(server).realtime.connect(model="parley") as conn:
            await conn.session.update(session={"type": "realtime", "instructions": "Answer in one short sentence."})
            await conn.conversation.item.create(
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is the capital of France?"}]}
            )
            await conn.response.create()
            events = await collect_until_done(conn)
        types = [e.type for e in events]
        assert "session.created" in types and "session.updated" in types, types
        audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
        assert len(audio) > 24000, f"only {len(audio)} bytes of audio"
        text = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
        assert "paris" in text.lower(), text
        done = events[-1]
        assert done.response.status == "completed"

    asyncio.run(main())


def test_audio_streamed_through_the_sdk_is_heard(server):
    async def main():
        pcm = espeak_pcm24k("one two three four")
        async with client(server).realtime.connect(model="parley") as conn:
            await conn.session.update(session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
            for i in range(0, len(pcm), 4800):
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 4800]).decode())
            await conn.input_audio_buffer.commit()
            async def transcript():
                async for event in conn:
                    if event.type == "conversation.item.input_audio_transcription.completed":
                        return event.transcript
            heard = await asyncio.wait_for(transcript(), 60)
        words = heard.lower().replace(",", " ").replace(".", " ").split()
        assert words[:4] == ["one", "two", "three", "four"] or "1234" in heard.replace(" ", "").replace(",", ""), heard

    asyncio.run(main())
