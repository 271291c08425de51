"""A minimal headless-Chromium driver over the Chrome DevTools Protocol (CDP).

Why not playwright/selenium: CI would need npm or a driver download. Chromium writes its debugging
port to `DevToolsActivePort` in the profile folder; one websocket to the page (aiohttp, which
ComfyUI already requires) is enough to evaluate scripts, read console errors and take screenshots.
"""
import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--remote-debugging-port=0"]


class JSError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page; use as a context manager (the process is always killed)."""

    def __init__(self, executable, profile_dir, size=(1600, 1000)):
        self.events = []
        self._id = 0
        self._loop = asyncio.new_event_loop()
        self._proc = subprocess.Popen([executable, *FLAGS, f"--user-data-dir={profile_dir}",
                                       f"--window-size={size[0]},{size[1]}", "about:blank"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port = self._port(profile_dir)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                page = next(t for t in json.load(r) if t["type"] == "page")
            self._loop.run_until_complete(self._connect(page["webSocketDebuggerUrl"]))
            for domain in ("Page", "Runtime", "Log"):
                self.call(f"{domain}.enable")
        except BaseException:
            self.close()
            raise

    def _port(self, profile_dir, timeout=60):
        path = os.path.join(profile_dir, "DevToolsActivePort")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self._proc.returncode}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                return int(open(path).read().split()[0])
            time.sleep(0.2)
        raise RuntimeError("chromium did not open its debugging port")

    async def _connect(self, ws_url):
        import aiohttp

        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(ws_url, max_msg_size=0)

    async def _call(self, method, params):
        self._id += 1
        call_id = self._id
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        while True:
            msg = await self._ws.receive()
            if msg.type.name != "TEXT":
                raise RuntimeError(f"CDP connection closed during {method}: {msg.type}")
            data = json.loads(msg.data)
            if data.get("id") == call_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data["result"]
            if "method" in data:
                self.events.append(data)

    def call(self, method, timeout=60, **params):
        return self._loop.run_until_complete(asyncio.wait_for(self._call(method, params), timeout))

    def evaluate(self, expression, timeout=120):
        """Value of a JS expression (promises awaited); JS exceptions raise JSError."""
        res = self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                        returnByValue=True)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise JSError(d.get("exception", {}).get("description") or d.get("text"))
        return res["result"].get("value")

    def wait_for(self, expression, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with contextlib.suppress(JSError):
                if self.evaluate(expression, timeout=30):
                    return
            time.sleep(0.5)
        raise TimeoutError(f"waited {timeout}s for: {expression}")

    def navigate(self, url):
        self.call("Page.navigate", url=url)

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def console_errors(self):
        """Uncaught exceptions and console.error / Log errors seen so far, as text."""
        out = []
        for e in self.events:
            p = e.get("params", {})
            if e["method"] == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append((d.get("exception", {}).get("description") or d.get("text", "")) + f" @ {d.get('url', '')}")
            elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") == "error":
                out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif e["method"] == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(p["entry"].get("text", "") + f" @ {p['entry'].get('url', '')}")
        return out

    def close(self):
        with contextlib.suppress(Exception):
            self._loop.run_until_complete(self._ws.close())
        with contextlib.suppress(Exception):
            self._loop.run_until_complete(self._session.close())
        self._loop.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=20)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
