"""A headless Chromium driven over its DevTools protocol: open a page, read it with JavaScript, take a
screenshot. For the dashboard's tests, its screenshot and the load benchmark; not part of a job.

Needs a Chromium binary (Debian's ``chromium`` package: ``apt-get install chromium``); nothing is
downloaded. The browser gets a fresh profile in a temporary folder and a debugging port the OS picks
(read back from the profile's ``DevToolsActivePort``), on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserError(RuntimeError):
    pass


def chromium_path() -> str | None:
    """The Chromium to use: ``$SPLITFT_CHROMIUM``, else the first of :data:`CANDIDATES` on PATH."""
    given = os.environ.get("SPLITFT_CHROMIUM")
    if given:
        return given
    return next((found for name in CANDIDATES if (found := shutil.which(name))), None)


class Page:
    """One tab, over its DevTools WebSocket."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self.socket = socket
        self._ids = itertools.count(1)
        self.errors: list[str] = []  # uncaught exceptions of the page's scripts, as they came

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self.socket.send_json({"id": call_id, "method": method, "params": params})
        while True:  # events of the page come in between: keep its script errors, skip the rest
            message = await self.socket.receive_json(timeout=60)
            if message.get("method") == "Runtime.exceptionThrown":
                details = message["params"]["exceptionDetails"]
                self.errors.append(str(details.get("exception", {}).get("description") or details.get("text")))
            if message.get("id") == call_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                result: dict[str, Any] = message.get("result", {})
                return result

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values)."""
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression!r} failed in the page: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    async def goto(self, url: str, timeout_s: float = 30.0) -> None:
        await self.call("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'", timeout_s)

    async def wait_for(self, expression: str, timeout_s: float = 30.0, poll_s: float = 0.1) -> Any:
        """Poll ``expression`` until it is truthy; its value, or a BrowserError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                errors = f"; the page's script failed: {self.errors[-1]}" if self.errors else ""
                raise BrowserError(f"waited {timeout_s:g} s for {expression!r}{errors}")
            await asyncio.sleep(poll_s)

    async def screenshot(self, path: Path) -> Path:
        """The page at its full height, as PNG."""
        height = await self.evaluate("document.documentElement.scrollHeight")
        width = await self.evaluate("document.documentElement.clientWidth")
        await self.call(
            "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False
        )
        data = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data["data"]))
        return path


@contextlib.asynccontextmanager
async def chromium(width: int = 1400, height: int = 1000, binary: str | None = None) -> AsyncIterator[Page]:
    """A headless Chromium with one blank page; the browser is ended (by its pid) on the way out."""
    binary = binary or chromium_path()
    if binary is None:
        raise BrowserError("no Chromium found (apt-get install chromium, or set SPLITFT_CHROMIUM)")
    profile = Path(tempfile.mkdtemp(prefix="splitft-chromium-"))
    command = [
        binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-extensions", "--disable-background-networking", "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank",
    ]  # fmt: skip
    with (profile / "chromium.log").open("wb") as log_file:  # a file, not a pipe: Chromium talks a lot
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        port = await _debugging_port(profile, process)
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
            async with session.ws_connect(page_url, max_msg_size=0) as socket:
                page = Page(socket)
                await page.call("Page.enable")
                await page.call("Runtime.enable")  # the page's script errors reach Page.errors
                yield page
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(profile, ignore_errors=True)


async def _debugging_port(profile: Path, process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = (profile / "chromium.log").read_text(errors="replace")
            raise BrowserError(f"Chromium exited with {process.returncode}: {output[-2000:]}")
        if marker.is_file():
            lines = marker.read_text().splitlines()
            if lines and lines[0].isdigit():
                return int(lines[0])
        await asyncio.sleep(0.1)
    raise BrowserError(f"Chromium did not open its debugging port within {timeout_s:g} s")
