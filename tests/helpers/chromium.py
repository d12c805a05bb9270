"""Headless Chromium driven over the DevTools protocol (CDP), with a small RFC 6455 websocket client of our own.

    with HeadlessChromium(binary, "http://127.0.0.1:8765/") as page:
        page.wait_for("window.cfLive && cfLive.ready")
        page.evaluate("document.title")
        page.screenshot("page.png")

`find_chromium()` names the binary (``$CHROMIUM``, else chromium / chromium-browser / google-chrome on the PATH), or
None. ``python -m tests.helpers.chromium URL OUT.png [--wait JS] [--size 1280x900]`` saves a screenshot of URL once
the JS expression is true.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium binary to drive: ``$CHROMIUM`` when set, else the first of `BINARIES` on the PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
    return next((found for name in BINARIES if (found := shutil.which(name))), None)


class WebSocket:
    """A client websocket (text messages only) over a plain TCP socket: ws://host:port/path."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        found = re.match(r"ws://([^/:]+):(\d+)(/.*)", url)
        if not found:
            raise ValueError(f"not a ws:// URL: {url}")
        host, port, path = found.group(1), int(found.group(2)), found.group(3)
        self.sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           ).encode())
        response = b""
        while b"\r\n\r\n" not in response:
            block = self.sock.recv(4096)
            if not block:
                raise ConnectionError("the websocket handshake was cut")
            response += block
        head, self.buffer = response.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"websocket handshake refused: {head.decode(errors='replace')[:200]}")

    def _exact(self, count: int) -> bytes:
        while len(self.buffer) < count:
            block = self.sock.recv(max(65536, count - len(self.buffer)))
            if not block:
                raise ConnectionError("the websocket closed")
            self.buffer += block
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data

    def _frame(self, opcode: int, payload: bytes) -> None:
        mask = os.urandom(4)
        size = len(payload)
        header = bytes([0x80 | opcode])
        if size < 126:
            header += bytes([0x80 | size])
        elif size < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", size)
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", size)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def send(self, text: str) -> None:
        self._frame(0x1, text.encode())

    def receive(self) -> str:
        """The next text message (pings answered, fragments joined)."""
        parts: list[bytes] = []
        while True:
            first, second = self._exact(2)
            opcode, size = first & 0x0F, second & 0x7F
            if size == 126:
                size = struct.unpack(">H", self._exact(2))[0]
            elif size == 127:
                size = struct.unpack(">Q", self._exact(8))[0]
            mask = self._exact(4) if second & 0x80 else None
            payload = self._exact(size)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            if opcode == 0x9:
                self._frame(0xA, payload)
            elif opcode == 0x8:
                raise ConnectionError("the websocket closed")
            elif opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if first & 0x80:
                    return b"".join(parts).decode()

    def close(self) -> None:
        try:
            self._frame(0x8, b"")
        except OSError:
            pass
        self.sock.close()


class HeadlessChromium:
    """A headless Chromium showing `url`, driven through its page's DevTools websocket."""

    def __init__(self, binary: str, url: str, size: tuple[int, int] = (1280, 900), timeout: float = 60.0) -> None:
        self.binary, self.url, self.size, self.timeout = binary, url, size, timeout
        self.next_id = 0

    def __enter__(self) -> "HeadlessChromium":
        self.profile = tempfile.TemporaryDirectory(prefix="cf-chromium-", ignore_cleanup_errors=True)
        log = Path(self.profile.name) / "stderr.log"
        self.log = log.open("wb")
        self.process = subprocess.Popen(
            [self.binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile.name}/profile", f"--window-size={self.size[0]},{self.size[1]}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True)
        try:
            port = self._devtools_port(log)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
                pages = [t for t in json.load(response) if t.get("type") == "page"]
            self.ws = WebSocket(pages[0]["webSocketDebuggerUrl"], timeout=self.timeout)
            self.call("Page.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                      deviceScaleFactor=1, mobile=False)
            self.call("Page.navigate", url=self.url)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _devtools_port(self, log: Path) -> int:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", log.read_text(errors="replace"))
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.binary} exited with {self.process.returncode}: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"{self.binary} did not open its DevTools port in {self.timeout:g} s")

    def __exit__(self, *exc: Any) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        # Chromium's helpers (renderer, crashpad) share its process group and may still write to the
        # profile after the browser exits: end the whole group before removing the profile.
        self._signal_group(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._signal_group(signal.SIGKILL)
        self.log.close()
        for _ in range(20):
            shutil.rmtree(self.profile.name, ignore_errors=True)
            if not Path(self.profile.name).exists():
                break
            time.sleep(0.1)
        self.profile.cleanup()

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one CDP command and return its result (events in between are skipped)."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.receive())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised in the page: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, poll: float = 0.1) -> Any:
        """Poll until the expression is truthy; returns its value (TimeoutError naming it otherwise)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page did not reach {expression!r} within {timeout:g} s")
            time.sleep(poll)

    def screenshot(self, path: str | Path) -> Path:
        """Save the viewport as a PNG."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path = Path(path)
        path.write_bytes(base64.b64decode(data))
        return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Screenshot a page with headless Chromium once a JS condition holds")
    parser.add_argument("url")
    parser.add_argument("out")
    parser.add_argument("--wait", default="document.readyState === 'complete'", help="JS expression to wait for")
    parser.add_argument("--size", default="1280x900", help="window size WxH")
    args = parser.parse_args()
    binary = find_chromium()
    if binary is None:
        raise SystemExit(f"no Chromium found (tried $CHROMIUM and {', '.join(BINARIES)})")
    width, height = (int(v) for v in args.size.split("x"))
    with HeadlessChromium(binary, args.url, (width, height)) as page:
        page.wait_for(args.wait)
        print(page.screenshot(args.out))


if __name__ == "__main__":
    main()
