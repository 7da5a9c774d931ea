"""Check the side-by-side page and the playground in a real browser, and take the README's screenshots.

    python scripts/screenshot_pages.py PAGE.html [--playground] [--out docs/generation]

Headless Chromium from the system's packages (Debian: apt-get install chromium), driven over its
DevTools protocol with `websockets` (pip install websockets; the script's own need, not the package's). For the page:
a screenshot, and its rendered DOM checked for both panels with text in them. For the playground
(`--playground`): the app is started on the demo model (or `--playground_args`), Chromium opens it and
waits for the first answer (the app generates on load), the DOM must hold the clean and the faulted
panel, and a screenshot is taken. Exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found: apt-get install chromium")


def browse(url: str, screenshot: Path, size: str, wait_s: float) -> str:
    """Open `url` in headless Chromium, wait (real time, up to `wait_s`) until both panels hold
    text, save a screenshot and return the rendered DOM. Driven over the DevTools protocol, so a
    page that fills itself from its server (the Gradio app) is read when it is done, not at load."""
    width, height = size.split(",")
    with tempfile.TemporaryDirectory() as profile:
        port = free_port()
        browser = subprocess.Popen(
            [chromium(), *FLAGS, f"--user-data-dir={profile}", f"--window-size={size}", f"--remote-debugging-port={port}", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            return asyncio.run(_drive(port, screenshot, int(width), int(height), wait_s))
        finally:
            browser.terminate()
            browser.wait(timeout=30)


async def _drive(port: int, screenshot: Path, width: int, height: int, wait_s: float) -> str:
    import websockets  # this script's own requirement (see the module docstring)

    target = await _page_target(port, wait_s)
    async with websockets.connect(target, max_size=2**26) as socket_:
        calls = iter(range(1, 1_000_000))

        async def call(method: str, **params: object) -> dict:
            number = next(calls)
            await socket_.send(json.dumps({"id": number, "method": method, "params": params}))
            while True:
                reply = json.loads(await socket_.recv())
                if reply.get("id") == number:
                    return reply.get("result", {})

        await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        deadline = time.monotonic() + wait_s
        dom = ""
        while time.monotonic() < deadline:
            result = await call("Runtime.evaluate", expression="document.documentElement.outerHTML", returnByValue=True)
            dom = result.get("result", {}).get("value", "")
            if all(panel_texts(dom).values()):
                break
            await asyncio.sleep(1)
        await asyncio.sleep(1)  # let the last paint land
        shot = await call("Page.captureScreenshot", format="png")
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        return dom


async def _page_target(port: int, wait_s: float) -> str:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as response:
                pages = [t for t in json.loads(response.read()) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
        except OSError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit("Chromium did not open its DevTools port")


def panel_texts(dom: str) -> dict[str, str]:
    """The text of the first clean and faulted panels in a rendered DOM."""
    texts = {}
    for name in ("clean", "faulted"):
        match = re.search(rf'class="text {name}"[^>]*>(.*?)</div>', dom, re.S) or re.search(rf"<h3>[^<]*{name}</h3>(.*?)</div>", dom, re.S)
        texts[name] = re.sub(r"<[^>]+>", "", match.group(1)).strip() if match else ""
    return texts


def check(dom: str, what: str) -> None:
    texts = panel_texts(dom)
    missing = [name for name, text in texts.items() if not text]
    if missing:
        raise SystemExit(f"{what}: the rendered page has no text in its {' and '.join(missing)} panel")
    print(f"{what}: clean panel {texts['clean'][:60]!r}, faulted panel {texts['faulted'][:60]!r}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def playground(out: Path, model: list[str], wait_s: float) -> None:
    port = free_port()
    command = [
        sys.executable,
        "-c",
        "from lm_eval_faults.cli import main; raise SystemExit(main())",
        "playground",
        *model,
        "--port",
        str(port),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(1)
        else:
            raise SystemExit(f"the playground did not start within {wait_s:.0f} s")
        dom = browse(f"http://127.0.0.1:{port}/", out / "playground.png", "1500,900", 120)
        check(dom, "playground")
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("page", nargs="?", type=Path, help="a side-by-side HTML page to check and screenshot")
    parser.add_argument("--playground", action="store_true", help="also start the playground and check it")
    parser.add_argument(
        "--playground_args", default="", help="arguments of `lm-eval-faults playground`, as one string (default: the demo model)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "generation", help="where the screenshots go")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.page:
        dom = browse(args.page.resolve().as_uri(), args.out / f"{args.page.stem}.png", "1400,1100", 30)
        check(dom, str(args.page))
    if args.playground:
        playground(args.out, shlex.split(args.playground_args), 300)


if __name__ == "__main__":
    main()
