"""The browser demo page at `/`, driven in headless Chromium with a fake microphone
fed from a WAV file (espeak-ng). One server (with `server.api_keys` set, so the
page must ask for a key and trade it for a client secret), one browser.

Checks: the spoken pharmacy question's transcript, a tool card and the agent's
answer appear; audio is played (the page's `window.__parley` counters); a latency
row appears; the settings panel applies `session.update`; the caller talking over
a long reply flushes playback and sends `conversation.item.truncate`; no uncaught
page error. Screenshots go to $PARLEY_TEST_OUT (default
$CARGO_TARGET_DIR/test-output/demo-page)."""

import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time

import pytest

from conftest import ROOT, running_parley
from webdriver import Chromium

KEY = "sk-browser-test"
PHARMACY_TOOLS = ("verify_member", "lookup_member", "list_orders", "get_order_details", "get_prescription", "get_pickup_time", "request_refill")
# With a date of birth, so a desk that verifies callers first can do so in one go.
QUESTION = "My member ID is 1001 and my date of birth is March 12, 1984. What orders do I have?"
STORY = "You are a storyteller. Whatever the caller asks for, answer with a long story of at least ten sentences."


def out_dir() -> pathlib.Path:
    if os.environ.get("PARLEY_TEST_OUT"):
        d = pathlib.Path(os.environ["PARLEY_TEST_OUT"])
    else:
        target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target")))
        d = target / "test-output" / "demo-page"
    d.mkdir(parents=True, exist_ok=True)
    return d


def question_wav(dir: pathlib.Path) -> pathlib.Path:
    """0.5 s of silence, the question, 3 s of silence; 48 kHz mono PCM16. Chromium
    loops the file, so the question comes back every few seconds: the test mutes the
    page's microphone after the first turn and unmutes it to interrupt."""
    raw = dir / "q-raw.wav"
    out = dir / "question.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "145", "-w", str(raw), QUESTION], check=True)
    subprocess.run(["sox", str(raw), "-r", "48000", "-c", "1", "-b", "16", str(out), "pad", "0.5", "3.0"], check=True)
    return out


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo-server")
    config = d / "parley.toml"
    config.write_text(f'[server]\napi_keys = ["{KEY}"]\n[tools]\npharmacy_db = "{d / "pharmacy.sqlite"}"\n')
    with open(out_dir() / "server.log", "w") as log, running_parley("--config", str(config), stderr=log) as addr:
        yield addr


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    for tool in ("chromium", "chromedriver"):
        if not shutil.which(tool) and not (tool == "chromium" and os.environ.get("PARLEY_CHROMIUM")):
            pytest.fail(f"{tool} is not installed; `bash scripts/setup.sh` installs it (Debian packages chromium, chromium-driver)")
    d = tmp_path_factory.mktemp("browser")
    wav = question_wav(d)
    profile = tempfile.mkdtemp(prefix="parley-chromium-")
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=1440,1200",
    ]
    b = Chromium(args, str(out_dir() / "chromedriver.log"))
    try:
        yield b
    finally:
        b.quit()
        shutil.rmtree(profile, ignore_errors=True)


HOOK = "return window.__parley && ({state: __parley.state, played: __parley.samplesPlayed, received: __parley.samplesReceived, sent: __parley.sent, rx: __parley.received, truncates: __parley.truncates, flushes: __parley.flushes, errors: __parley.errors, pageErrors: __parley.pageErrors, toolCalls: __parley.toolCalls, metrics: __parley.metrics, muted: __parley.micMuted, quiet: __parley.micQuietMs});"


def test_the_demo_page_talks_to_the_agent(keyed_server, browser):
    b = browser
    out = out_dir()
    try:
        run(b, keyed_server, out)
    except BaseException:
        try:
            b.screenshot(str(out / "failure.png"))
            (out / "failure-state.json").write_text(json.dumps(b.js(HOOK), indent=2))
            (out / "failure-console.json").write_text(json.dumps(b.console(), indent=2))
        except Exception:
            pass
        raise


def run(b: Chromium, addr: str, out: pathlib.Path):
    b.get(f"http://{addr}/")
    b.wait("the page script", "return window.__parley && window.__parley.ready", 15)
    # The server needs a key: the page asks for it.
    b.wait("the key prompt", "return !document.getElementById('key-panel').hidden", 10)
    b.type("#api-key", KEY)
    b.click("#key-form button[type=submit]")
    b.wait("the call to go live", "return __parley.state === 'live' || __parley.errors.length && __parley.errors.join(' | ')", 30)
    state = b.js(HOOK)
    assert state["state"] == "live", state["errors"]
    assert b.js("return document.getElementById('key-panel').hidden"), "the key prompt should close once connected"

    # Turn 1: the spoken pharmacy question. Mute once the VAD heard its end, before
    # the looping file says it again.
    b.wait("the end of the spoken question", "return (__parley.received['input_audio_buffer.speech_stopped'] || 0) >= 1", 30)
    b.js("__parley.setMicMuted(true)")
    heard = b.wait("the question's transcript on the page", "const u = [...document.querySelectorAll('.msg.user .text')].map(e => e.textContent).join(' '); return u.trim() && u", 60)
    assert any(w in heard.lower() for w in ("member", "order", "1001")), f"transcript on the page: {heard!r}"
    b.wait("a tool card", "return document.querySelector('.tool-card.done')", 150)
    card = b.js("const c = document.querySelector('.tool-card.done'); return {name: c.dataset.name, args: c.querySelector('.args').textContent, result: c.querySelector('.result').textContent, took: c.querySelector('.duration').textContent};")
    assert card["name"] in PHARMACY_TOOLS, card
    assert card["result"] and card["took"] != "…", card
    b.wait("the agent's answer", "return (__parley.received['response.done'] || 0) >= 1 && [...document.querySelectorAll('.msg.agent .text')].some(e => e.textContent.trim().length > 3)", 150)
    b.wait("audio played", f"return __parley.samplesPlayed > {24000 // 2}", 60)
    b.wait("a latency row", "return document.querySelector('#latency-rows .latency-row')", 30)
    row = b.js("return [...document.querySelectorAll('#latency-rows .latency-row td')].map(td => td.textContent)")
    assert any(c.endswith(" ms") for c in row[1:5]), row
    b.screenshot(str(out / "01-answer.png"))

    # Settings panel: ask for long replies, applied with session.update.
    b.click("#settings summary")
    b.js("document.getElementById('set-instructions').value = arguments[0]", STORY)
    b.click("#set-tools")  # tools off: a story, not a pharmacy lookup
    b.click("#settings-apply")
    b.wait("session.updated", "return document.getElementById('settings-note').textContent === 'applied'", 20)

    # Turn 2: a typed request for a long reply; talk over it once it plays.
    before = b.js("return __parley.samplesPlayed")
    b.type("#text-input", "Tell me a long story about a dragon who learns to bake bread.\n")
    b.wait("the long reply to play", f"return __parley.samplesPlayed > {before + 24000}", 150)
    # Unmute just before the looping question comes round again (the mic has been
    # quiet for most of the gap), so it lands while the agent talks.
    b.wait("a quiet stretch of the fake microphone while the agent talks", "return __parley.responding && __parley.micQuietMs > 2600", 60, interval=0.02)
    stops = b.js("return __parley.received['input_audio_buffer.speech_stopped'] || 0")
    b.js("__parley.setMicMuted(false)")
    # Say it once: mute again when the VAD has heard the end of the interruption.
    b.wait("the interruption's end", f"return (__parley.received['input_audio_buffer.speech_stopped'] || 0) > {stops} || __parley.truncates.length", 30)
    b.js("__parley.setMicMuted(true)")
    b.wait("the barge-in flush and truncate", "return __parley.truncates.length >= 1", 90)
    state = b.js(HOOK)
    t = state["truncates"][0]
    assert t["audio_end_ms"] > 0 and t["item_id"], state["truncates"]
    assert state["sent"].get("conversation.item.truncate", 0) >= 1, state["sent"]
    at_flush = b.js("return __parley.samplesPlayed")
    time.sleep(1.0)
    after = b.js("return __parley.samplesPlayed")
    # Playback stopped at once: at most what the worklet reported in flight (100 ms).
    assert after - at_flush <= 24000 * 0.25, f"playback went on after the flush: {at_flush} → {after}"
    b.wait("the server's truncated event", "return (__parley.received['conversation.item.truncated'] || 0) >= 1", 15)
    assert b.js("return !!document.querySelector('.msg.agent.interrupted')"), "the cut reply is marked as interrupted"
    b.screenshot(str(out / "02-interrupted.png"))

    # The call's transcript is ready to download; no uncaught page error, no error shown.
    assert b.js("return document.getElementById('download-transcript').disabled") is False
    state = b.js(HOOK)
    assert not state["pageErrors"], state["pageErrors"]
    assert not state["errors"], state["errors"]
    severe = [e for e in b.console() if e.get("level") == "SEVERE"]
    assert not severe, severe
    (out / "state.json").write_text(json.dumps(state, indent=2))
