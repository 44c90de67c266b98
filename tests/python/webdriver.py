"""A small W3C WebDriver client over urllib, for driving headless Chromium through
chromedriver without extra packages: sessions, navigation, scripts, clicks, typing,
screenshots and the browser's console log."""

import base64
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebDriverError(RuntimeError):
    pass


class Chromium:
    """Headless Chromium under chromedriver; one session."""

    def __init__(self, args: list[str], log_path: str):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.driver = subprocess.Popen(["chromedriver", f"--port={self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except (OSError, WebDriverError):
                pass
            if time.time() > deadline or self.driver.poll() is not None:
                raise WebDriverError(f"chromedriver did not start (log: {log_path})")
            time.sleep(0.1)
        caps = {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": os.environ.get("PARLEY_CHROMIUM", "/usr/bin/chromium"), "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }
        self.session = self._call("POST", "/session", {"capabilities": {"alwaysMatch": caps}})["sessionId"]

    def _call(self, method: str, path: str, body=None, timeout: float = 60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"{}").get("value")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise WebDriverError(f"{method} {path}: HTTP {e.code}: {detail[:2000]}") from None

    def cmd(self, method: str, path: str, body=None, timeout: float = 60):
        return self._call(method, f"/session/{self.session}{path}", body, timeout)

    def get(self, url: str):
        self.cmd("POST", "/url", {"url": url})

    def js(self, script: str, *args):
        """Runs `script` (a function body; `return` gives the value) in the page."""
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css: str) -> str:
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def click(self, css: str):
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css: str, text: str):
        self.cmd("POST", f"/element/{self.find(css)}/value", {"text": text})

    def screenshot(self, path: str):
        png = base64.b64decode(self.cmd("GET", "/screenshot"))
        with open(path, "wb") as f:
            f.write(png)

    def console(self) -> list[dict]:
        """Console entries since the last call (chromedriver's legacy log endpoint)."""
        try:
            return self.cmd("POST", "/se/log", {"type": "browser"}) or []
        except WebDriverError:
            return []

    def wait(self, what: str, script: str, timeout: float, interval: float = 0.1):
        """Polls `script` until it returns something truthy; returns that."""
        deadline = time.time() + timeout
        while True:
            v = self.js(script)
            if v:
                return v
            if time.time() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(interval)

    def quit(self):
        try:
            self.cmd("DELETE", "", timeout=10)
        except Exception:
            pass
        self.driver.terminate()
        try:
            self.driver.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.driver.kill()
        self.log.close()
