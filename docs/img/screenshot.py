"""Screenshots of a web page in headless Chromium, through the DevTools protocol (aiohttp, which
Ray already installs), after real time has passed: TensorBoard draws its charts asynchronously.

    python docs/img/screenshot.py URL OUT.png [--wait 8] [--size 1400x900] [--js "..."] [--scale 1]
"""

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def shoot(ws_url: str, url: str, out: str, wait: float, js: list[str], w: int, h: int) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        n = 0

        async def call(method, **params):
            nonlocal n
            n += 1
            await ws.send_str(json.dumps({"id": n, "method": method, "params": params}))
            async for msg in ws:
                data = json.loads(msg.data)
                if data.get("id") == n:
                    return data.get("result", {})

        await call("Emulation.setDeviceMetricsOverride", width=w, height=h, deviceScaleFactor=1, mobile=False)
        await call("Page.navigate", url=url)
        await asyncio.sleep(wait)
        for snippet in js:
            await call("Runtime.evaluate", expression=snippet, awaitPromise=True)
            await asyncio.sleep(wait / 2)
        shot = await call("Page.captureScreenshot", format="png")
        with open(out, "wb") as f:
            f.write(base64.b64decode(shot["data"]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("out")
    ap.add_argument("--wait", type=float, default=8)
    ap.add_argument("--size", default="1400x900")
    ap.add_argument("--js", action="append", default=[])
    a = ap.parse_args()
    w, h = map(int, a.size.split("x"))
    port, profile = free_port(), tempfile.mkdtemp(prefix="chromium_")
    proc = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--hide-scrollbars", f"--window-size={w},{h}",
                             "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                             f"--remote-debugging-port={port}", f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(60):
            try:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2).read())
                page = next(t for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration):
                time.sleep(0.5)
        asyncio.run(shoot(page["webSocketDebuggerUrl"], a.url, a.out, a.wait, a.js, w, h))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
