"""Per-turn latency, CPU and memory of spoken calls, one or more parley builds side by side.

Run by bench/turn_latency.sh (which builds and passes the binaries). Every build gets its
own server, started fresh; the calls alternate between the servers question by question
(which build goes first alternates too), so a machine that drifts slows all alike. Each
call is one spoken question streamed in real time by `parley call` over /v1/realtime.

Printed: per build, p50/p95 of each stage (ms from the end of the caller's speech), of
the client-seen first agent audio for plain and tool questions, CPU-seconds the server
spent per call, the first call after start against the later ones, and peak RSS; then
new/old ratios.
"""

import json
import os
import statistics as st
import subprocess
import sys
import tempfile
import time
import urllib.request

PLAIN = [
    "What is the capital of France?",
    "How many days are there in a week?",
    "What color is the sky on a clear day?",
    "Can you recommend a good book to read?",
    "What is the tallest mountain in the world?",
    "How many legs does a spider have?",
]
TOOL = [
    "What is the status of order O R D zero zero two?",
    "When can I pick up order O R D zero zero two?",
    "Is order O R D zero zero three shipped yet?",
    "How many refills are left on prescription R X one zero zero one?",
]
STAGES = [
    ("endpoint_ms", "endpoint"),
    ("asr_ms", "asr"),
    ("transcript_ms", "transcript"),
    ("prefill_ms", "prefill"),
    ("first_token_ms", "1st token"),
    ("first_audio_ms", "1st audio (server)"),
    ("client_first_audio_ms", "1st audio (client)"),
]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def peak_rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def start_server(name, binary, work):
    out = open(os.path.join(work, f"server-{name}.out"), "w+")
    err = open(os.path.join(work, f"server-{name}.err"), "w")
    env = dict(os.environ, PARLEY_LOG="warn")
    started = time.monotonic()
    proc = subprocess.Popen([binary, "serve", "--listen", "127.0.0.1:0"], stdout=out, stderr=err, env=env)
    addr = None
    for _ in range(3000):
        if proc.poll() is not None:
            sys.exit(f"server {name} exited; see {err.name}")
        out.seek(0)
        for line in out.read().splitlines():
            if line.startswith("parley listening on http://"):
                addr = line.split("http://", 1)[1].strip()
        if addr:
            try:
                with urllib.request.urlopen(f"http://{addr}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return proc, addr, time.monotonic() - started
            except Exception:
                pass
        time.sleep(0.1)
    sys.exit(f"server {name} never became ready")


def pct(values, q):
    values = sorted(v for v in values if v is not None)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def main():
    caller = sys.argv[1]
    builds = [arg.split("=", 1) for arg in sys.argv[2:]]
    rounds = int(os.environ.get("ROUNDS", "2"))
    work = tempfile.mkdtemp(prefix="turn_latency.")
    questions = [(q, "plain") for q in PLAIN] + [(q, "tool") for q in TOOL]
    wavs = []
    for i, (q, _) in enumerate(questions):
        wav = os.path.join(work, f"q{i}.wav")
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", wav, q], check=True)
        wavs.append(wav)

    servers = {}
    try:
        for name, binary in builds:
            proc, addr, ready_s = start_server(name, binary, work)
            servers[name] = {"proc": proc, "addr": addr, "ready_s": ready_s, "rows": []}
            print(f"{name}: ready in {ready_s:.1f} s at {addr}", flush=True)
        n = 0
        for r in range(rounds):
            for i, (q, kind) in enumerate(questions):
                order = builds if n % 2 == 0 else list(reversed(builds))
                n += 1
                for name, _ in order:
                    s = servers[name]
                    metrics = os.path.join(work, f"metrics-{name}.jsonl")
                    before = cpu_seconds(s["proc"].pid)
                    out = subprocess.run(
                        [caller, "call", wavs[i], "--url", f"ws://{s['addr']}/v1/realtime",
                         "--out", os.path.join(work, f"a-{name}-{i}.wav"), "--metrics-out", metrics],
                        capture_output=True, text=True, timeout=300)
                    cpu = cpu_seconds(s["proc"].pid) - before
                    with open(metrics) as f:
                        lines = f.read().splitlines()
                    row = json.loads(lines[-1]) if len(lines) > len(s["rows"]) else {}
                    row.update(kind=kind, question=q, cpu_s=cpu, first=len(s["rows"]) == 0)
                    heard = [l[5:] for l in out.stdout.splitlines() if l.startswith("you: ")]
                    said = [l[7:] for l in out.stdout.splitlines() if l.startswith("agent: ")]
                    row.update(heard=" ".join(heard), said=" ".join(said))
                    s["rows"].append(row)
                    print(f"  {name:>6} {kind:5} {row.get('client_first_audio_ms') or float('nan'):7.0f} ms "
                          f"cpu {cpu:5.2f} s | {row['heard'][:50]!r} -> {row['said'][:70]!r}", flush=True)
        for s in servers.values():
            s["peak_rss_mb"] = peak_rss_mb(s["proc"].pid)
    finally:
        for s in servers.values():
            s["proc"].terminate()

    print(f"\n{rounds} rounds x {len(questions)} spoken questions per build "
          f"({len(PLAIN)} plain, {len(TOOL)} tool); ms from the end of the caller's speech; p50 / p95")
    header = f"{'stage':24}" + "".join(f"{name:>22}" for name, _ in builds)
    if len(builds) == 2:
        header += f"{'p50 ratio':>12}"
    print(header)

    def line(label, getter, fmt="{:8.0f} / {:<8.0f}"):
        cells, p50s = [], []
        for name, _ in builds:
            values = [getter(row) for row in servers[name]["rows"]]
            values = [v for v in values if v is not None]
            p50s.append(pct(values, 0.5))
            cells.append(fmt.format(pct(values, 0.5), pct(values, 0.95)))
        text = f"{label:24}" + "".join(f"{c:>22}" for c in cells)
        if len(builds) == 2 and p50s[0]:
            text += f"{p50s[1] / p50s[0]:11.2f}x"
        print(text)

    for key, label in STAGES:
        line(label, lambda row, key=key: row.get(key))
    line("e2e, plain questions", lambda row: row.get("client_first_audio_ms") if row["kind"] == "plain" else None)
    line("e2e, tool questions", lambda row: row.get("client_first_audio_ms") if row["kind"] == "tool" else None)
    line("CPU s per call", lambda row: row["cpu_s"], "{:8.2f} / {:<8.2f}")
    line("CPU s per plain call", lambda row: row["cpu_s"] if row["kind"] == "plain" else None, "{:8.2f} / {:<8.2f}")
    print()
    for name, _ in builds:
        s = servers[name]
        rows = s["rows"]
        first = rows[0]
        later = [r.get("client_first_audio_ms") for r in rows[1:] if r["question"] == first["question"]]
        later_all = [r.get("client_first_audio_ms") for r in rows[1:] if r["kind"] == first["kind"]]
        ref = st.median([v for v in later if v is not None] or [v for v in later_all if v is not None] or [float("nan")])
        fa = first.get("client_first_audio_ms") or float("nan")
        print(f"{name}: ready {s['ready_s']:.1f} s after start; first call {fa:.0f} ms vs later calls of the "
              f"same question {ref:.0f} ms ({fa / ref:.2f}x); peak RSS {s['peak_rss_mb']:.0f} MB")
    if len(builds) == 2:
        a, b = (servers[name]["peak_rss_mb"] for name, _ in builds)
        print(f"peak RSS ratio {builds[1][0]}/{builds[0][0]}: {b / a:.2f}x")


if __name__ == "__main__":
    main()
