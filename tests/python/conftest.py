"""Starts one real `parley serve` on a free port for the Python client tests."""

import contextlib
import os
import pathlib
import subprocess
import time
import urllib.request

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def parley_bin() -> str:
    if os.environ.get("PARLEY_BIN"):
        return os.environ["PARLEY_BIN"]
    target = os.environ.get("CARGO_TARGET_DIR", str(ROOT / "target"))
    return str(pathlib.Path(target) / "release" / "parley")


@contextlib.contextmanager
def running_parley(*args, env=None, stderr=None, ready=None):
    """Runs `parley serve --listen 127.0.0.1:0 ARGS` until the block ends: waits
    for its address, then until `ready(addr)` is true (by default, until /readyz
    answers 200), and yields the address. One start-up for every test file."""
    full_env = dict(os.environ)
    full_env.setdefault("PARLEY_LOG", "warn")
    full_env.update(env or {})
    proc = subprocess.Popen(
        [parley_bin(), "serve", "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=full_env,
    )
    try:
        addr = None
        for line in proc.stdout:
            if line.startswith("parley listening on http://"):
                addr = line.strip().removeprefix("parley listening on http://")
                break
        assert addr, "parley exited before listening"
        deadline = time.time() + 300
        while not (ready or readyz)(addr):
            assert proc.poll() is None, f"parley exited with {proc.returncode} before it was ready"
            assert time.time() < deadline, "parley did not become ready"
            time.sleep(0.2)
        yield addr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def readyz(addr) -> bool:
    """True once the server's models are loaded."""
    try:
        with urllib.request.urlopen(f"http://{addr}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def server():
    with running_parley() as addr:
        yield addr
