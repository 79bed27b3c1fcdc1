"""The built site in a real browser: served on 127.0.0.1, every other host unreachable.

Loads the architecture page in headless Chromium and checks that the U diagram is rendered as an SVG
(not left as Mermaid source text), that nothing was requested from another host, and that a block
page (diagram and formula) and the API page render, that every diagram on every page renders, and
that search and diagrams also work with the site opened from disk (`file://`). Screenshots are kept as test artifacts in
`artifacts/` at the repository root (gitignored): `docs-architecture.png` (the whole page),
`docs-block-resblock.png` (scrolled to its traced diagram) and `docs-api.png` (scrolled to
`UNet3D.forward`'s signature).

Skipped only where no Chromium binary is installed (`.ci/run` installs it, and sets
`CPCBM_REQUIRE_BROWSER=1` so that CI fails instead of skipping).
"""

import os
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest

from .chromium import Chromium, attributes, descendants, find_chromium, text_of
from .conftest import ARTIFACTS

CHROMIUM = find_chromium()

if CHROMIUM is None and os.environ.get("CPCBM_REQUIRE_BROWSER") != "1":
    pytest.skip("Chromium is not installed (apt-get install chromium); the real-browser docs test needs it",
                allow_module_level=True)


class _QuietHandler(SimpleHTTPRequestHandler):
    requests: list[tuple[str, int]]

    def log_request(self, code="-", size="-"):
        self.requests.append((self.path, int(code)))

    def log_message(self, format, *args):
        pass


@pytest.fixture(scope="module")
def served(built_site):
    site = built_site.check()
    handler = type("Handler", (_QuietHandler,), {"requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM is not None, "CPCBM_REQUIRE_BROWSER=1 but no Chromium binary was found"
    with Chromium(CHROMIUM, width=1280, height=1100) as chromium:
        yield chromium


_RENDERED = "document.querySelectorAll('pre.mermaid').length === 0 && document.querySelectorAll('div.mermaid').length > 0"
_TYPESET = "document.querySelectorAll('.arithmatex mjx-container svg').length > 0"


def _mermaid_svgs(browser: Chromium) -> list[dict]:
    """SVG elements inside Material's mermaid hosts (they live in closed shadow roots)."""
    svgs = []
    for node in descendants(browser.document()):
        if node.get("nodeName") == "DIV" and "mermaid" in attributes(node).get("class", "").split():
            svgs += [n for n in descendants(node) if n.get("nodeName", "").lower() == "svg"]
    return svgs


def test_architecture_diagram_is_rendered_as_svg_with_no_other_host(served, browser):
    base, requests = served
    ARTIFACTS.mkdir(exist_ok=True)
    browser.open(f"{base}/architecture/unet.html")
    assert browser.wait_for(_RENDERED), "the Mermaid source was not replaced by a rendered diagram"
    svgs = _mermaid_svgs(browser)
    assert len(svgs) == 1
    labels = text_of(svgs[0])
    for text in ("level 1 down", "level 4 up", "2 skips · 32,8,256,256", "mid · 256 ch · 1×16×16",
                 "output · 1,8,256,256"):
        assert text in labels
    assert "block-beta" not in browser.evaluate("document.body.innerText")
    browser.screenshot(ARTIFACTS / "docs-architecture.png", full_page=True)

    hosts = {urlparse(url).hostname for url in browser.requested_urls() if urlparse(url).scheme in ("http", "https")}
    assert hosts == {"127.0.0.1"}
    assert any(path.endswith("vendor/mermaid.min.js") and code == 200 for path, code in requests)
    missing = [(path, code) for path, code in requests if code >= 400]
    assert missing == []


def test_a_block_page_renders_its_diagram_and_formula(served, browser):
    base, _ = served
    browser.open(f"{base}/blocks/resblock.html")
    assert browser.wait_for(_RENDERED) and browser.wait_for(_TYPESET)
    svgs = _mermaid_svgs(browser)
    assert len(svgs) == 1 and "conv2: Conv3d 3×3×3" in text_of(svgs[0])
    browser.evaluate("document.getElementById('shapes-and-data-flow').scrollIntoView()")
    browser.screenshot(ARTIFACTS / "docs-block-resblock.png")


def test_the_api_page_renders_signatures_with_shapes(served, browser):
    base, _ = served
    browser.open(f"{base}/api.html")
    assert browser.wait_for("document.querySelector('h2#cpcbm_blocks.UNet3D, [id=\"cpcbm_blocks.UNet3D\"]') !== null")
    text = browser.evaluate("document.body.innerText")
    assert 'Float[Tensor, "b c_in d h w"]' in text
    browser.evaluate("document.getElementById('cpcbm_blocks.UNet3D.forward').scrollIntoView()")
    browser.screenshot(ARTIFACTS / "docs-api.png")


def test_search_and_diagrams_work_when_the_site_is_opened_from_disk(built_site, browser):
    site = built_site.check()
    browser.open(f"{(site / 'index.html').as_uri()}?q=ResBlock3D")
    assert browser.wait_for("document.querySelectorAll('.md-search-result__item').length > 0"), "no search results"
    titles = browser.evaluate("[...document.querySelectorAll('.md-search-result__item h1')].map(e => e.innerText)")
    assert "ResBlock3D" in titles
    browser.open((site / "architecture" / "unet.html").as_uri())
    assert browser.wait_for(_RENDERED)
    assert len(_mermaid_svgs(browser)) == 1


def test_every_diagram_on_every_page_renders(built_site, served, browser):
    site = built_site.check()
    base, _ = served
    pages = [p for p in sorted(site.rglob("*.html")) if '<pre class="mermaid">' in p.read_text()]
    assert len(pages) >= 13                       # architecture, conditioning, 11 block pages
    failed = []
    for page in pages:
        count = page.read_text().count('<pre class="mermaid">')
        browser.open(f"{base}/{page.relative_to(site).as_posix()}")
        rendered = (f"document.querySelectorAll('pre.mermaid').length === 0 && "
                    f"document.querySelectorAll('div.mermaid').length === {count}")
        if not browser.wait_for(rendered) or len(_mermaid_svgs(browser)) != count:
            failed.append(page.relative_to(site).as_posix())
    assert failed == []
