"""A minimal headless-Chromium driver over the DevTools protocol on a pipe (no extra packages).

`chromium --remote-debugging-pipe` reads protocol messages from file descriptor 3 and writes its
replies to descriptor 4, each message JSON terminated by a NUL byte. That is all the browser test
needs: open a page, wait for a condition, read the DOM including closed shadow roots (where Material
puts rendered Mermaid diagrams), list every network request, and take a screenshot.

Every host except 127.0.0.1 is unresolvable for this browser (`--host-resolver-rules`), so a page
that still needs a CDN visibly fails instead of quietly fetching it.
"""

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

OFFLINE_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-quic", "--hide-scrollbars",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


class Chromium:
    """One headless browser with one tab; use as a context manager."""

    def __init__(self, binary: str, *, width: int = 1280, height: int = 1000) -> None:
        self._profile = tempfile.mkdtemp(prefix="cpcbm-chromium-")
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()

        def use_pipes_as_fds_3_and_4() -> None:
            # Move both ends above 4 first, so that dup2 cannot clobber one with the other.
            read_end = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        # close_fds=False: os.pipe() descriptors are close-on-exec, so only the dup2'd 3 and 4 survive exec.
        self._process = subprocess.Popen(
            [binary, *OFFLINE_FLAGS, "--remote-debugging-pipe", f"--user-data-dir={self._profile}",
             f"--window-size={width},{height}", "about:blank"],
            # Only two syscalls run in the child before exec, so forking beside the test's server thread is safe.
            preexec_fn=use_pipes_as_fds_3_and_4, close_fds=False,  # noqa: PLW1509
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser_read)
        os.close(from_browser_write)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self.call(f"{domain}.enable", session=True)

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self.call("Browser.close")
            self._process.wait(timeout=10)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            self._process.kill()
            self._process.wait()
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)
            shutil.rmtree(self._profile, ignore_errors=True)

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium closed its protocol pipe (exit code {self._process.poll()})")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, *, session: bool = False, **params: Any) -> dict[str, Any]:
        """Send one protocol command and return its result; events that arrive meanwhile are kept."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._receive()
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def open(self, url: str, *, timeout: float = 30.0) -> None:
        """Navigate and wait until the new document has loaded (not the previous one)."""
        self.call("Page.navigate", session=True, url=url)
        target = json.dumps(url.split("#")[0])
        if not self.wait_for(f"location.href.split('#')[0] === {target} && document.readyState === 'complete'",
                             timeout=timeout):
            raise TimeoutError(f"{url} did not finish loading in {timeout} s")

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression: str, *, timeout: float = 30.0) -> bool:
        """Poll a JavaScript expression until it is truthy; False when `timeout` seconds pass first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.evaluate(expression):
                return True
            time.sleep(0.2)
        return False

    def document(self) -> dict[str, Any]:
        """The whole DOM tree, shadow roots (open and closed) included."""
        return self.call("DOM.getDocument", session=True, depth=-1, pierce=True)["root"]

    def requested_urls(self) -> list[str]:
        return [event["params"]["request"]["url"] for event in self.events
                if event.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: Path, *, full_page: bool = False) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=full_page)["data"]
        path.write_bytes(base64.b64decode(data))


def attributes(node: dict[str, Any]) -> dict[str, str]:
    values = node.get("attributes", [])
    return dict(zip(values[::2], values[1::2]))


def descendants(node: dict[str, Any]):
    """Every node below `node`, walking into shadow roots and iframes' documents too."""
    for child in [*node.get("children", []), *node.get("shadowRoots", []),
                  *([node["contentDocument"]] if "contentDocument" in node else [])]:
        yield child
        yield from descendants(child)


def text_of(node: dict[str, Any]) -> str:
    return "".join(n.get("nodeValue", "") for n in descendants(node) if n.get("nodeType") == 3)
