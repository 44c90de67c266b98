"""Starts one real `parley serve` on a free port for the Python client tests."""

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


@pytest.fixture(scope="session")
def server():
    env = dict(os.environ)
    env.setdefault("PARLEY_LOG", "warn")
    proc = subprocess.Popen(
        [parley_bin(), "serve", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        addr = None
        for line in proc.stdout:
            if line.startswith("parley listening on http://"):
                addr = line.strip().removeprefix("parley listening on http://")
                break
        assert addr, "parley exited before listening"
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://{addr}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "parley did not become ready"
            time.sleep(0.2)
        yield addr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
