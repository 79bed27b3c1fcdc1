"""The docs site builds with `mkdocs build --strict`, offline, with the generated content in place."""

import html
import re
from html.parser import HTMLParser
from pathlib import Path

import torch
import yaml

from cpcbm_blocks import UNet3D, UNetSpec

from ..conftest import ROOT

EXTERNAL = re.compile(r"^(https?:)?//", re.IGNORECASE)


class _Resources(HTMLParser):
    """Collects the URLs a page *loads* (scripts, styles, images, frames), not the links it shows."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if tag in ("script", "img", "iframe", "source", "video", "audio", "embed") and values.get("src"):
            self.urls.append(values["src"])
        if tag == "link" and values.get("href") and values.get("rel") not in ("canonical", "alternate"):
            self.urls.append(values["href"])


def _pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


def _text(page: Path) -> str:
    """The page's text with tags removed and entities decoded (signatures are split into spans)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text()))


def _table_rows(page: Path) -> list[list[str]]:
    """Every table row of a page, as the text of its cells."""
    rows = re.findall(r"<tr>(.*?)</tr>", page.read_text(), re.DOTALL)
    return [[html.unescape(re.sub(r"<[^>]+>", "", cell)).strip()
             for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.DOTALL)] for row in rows]


def _nav_sources(items) -> list[str]:
    sources = []
    for item in items:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        sources += _nav_sources(value) if isinstance(value, list) else [value]
    return sources


def test_site_builds_with_strict(built_site):
    built_site.check()
    print(f"mkdocs build --strict took {built_site.seconds:.1f} s")


def test_every_page_in_the_nav_is_built(built_site):
    site = built_site.check()
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)  # no !!python tags needed
    sources = _nav_sources(config["nav"])
    assert len(sources) >= 15
    for source in sources:
        built = site / re.sub(r"\.(md|ipynb)$", ".html", source)
        assert built.is_file(), f"{source} was not built"


def test_no_page_loads_anything_from_another_host(built_site):
    site = built_site.check()
    offenders = []
    for page in _pages(site):
        parser = _Resources()
        parser.feed(page.read_text())
        offenders += [f"{page.relative_to(site)}: {url}" for url in parser.urls if EXTERNAL.match(url)]
        for host in ("fonts.googleapis", "fonts.gstatic", "unpkg.com", "cdn.jsdelivr", "cdnjs.cloudflare"):
            if host in page.read_text():
                offenders.append(f"{page.relative_to(site)}: mentions {host}")
    for stylesheet in site.rglob("*.css"):
        offenders += [f"{stylesheet.relative_to(site)}: {url}"
                      for url in re.findall(r"url\(['\"]?((?:https?:)?//[^)'\"]+)", stylesheet.read_text())]
    assert offenders == []


def test_search_works_from_disk(built_site):
    site = built_site.check()
    index = site / "search" / "search_index.js"        # the offline plugin inlines the index for file://
    assert index.is_file() and "ResBlock3D" in index.read_text()
    assert (site / "assets" / "javascripts" / "vendor" / "iframe-worker-shim.js").is_file()


def test_architecture_page_has_the_generated_u_the_verified_traces_and_the_table(built_site):
    site = built_site.check()
    page = (site / "architecture" / "unet.html").read_text()
    diagrams = re.findall(r'<pre class="mermaid"><code>(.*?)</code></pre>', page, re.DOTALL)
    assert len(diagrams) == 1
    diagram = html.unescape(diagrams[0])
    assert diagram.startswith("block-beta")
    for number in range(1, 5):
        assert f"level {number} down" in diagram and f"level {number} up" in diagram
        assert f"down{number} -- \"2 skips" in diagram
    assert "class down4,up4,mid attention" in diagram
    text = _text(site / "architecture" / "unet.html")
    assert "Verified at build time: the seed's trace equals the code" in text
    assert "38 of 38 recorded transitions match" in text
    assert "Down-{1,8,256,256 ->(conv_in)-> 32,8,256,256" in text
    assert "output head (beyond the seed trace)" in text
    with torch.device("meta"):
        total = sum(p.numel() for p in UNet3D(UNetSpec.default()).parameters())
    assert f"{total:,}" in text


def test_every_block_page_has_its_traced_data_flow_and_signature(built_site):
    site = built_site.check()
    expected = {"blocks/resblock": "conv2: Conv3d", "blocks/downsample": "conv: Conv3d 1×3×3, stride 1×2×2",
                "blocks/upsample": "upsample_conv3d", "blocks/attention": "scaled_dot_product_attention",
                "blocks/timestep-embedding": "sinusoidal_embedding", "blocks/output-head": "norm: GroupNorm",
                "fusion/cond-image-encoder": "down.1.conv: Conv3d 1×3×3, stride 1×2×2",
                "fusion/gated-fusion": "sigmoid", "fusion/gated-injection": "proj: Conv3d 1×1×1",
                "fusion/dynamic-conv": "conv3d", "fusion/cross-attention": "scaled_dot_product_attention"}
    for name, node in expected.items():
        page = site / f"{name}.html"
        diagrams = [html.unescape(d) for d in re.findall(r'<pre class="mermaid"><code>(.*?)</code></pre>',
                                                         page.read_text(), re.DOTALL)]
        assert len(diagrams) == 1 and diagrams[0].startswith("flowchart TD"), name
        assert node in diagrams[0] and "--> output" in diagrams[0], name
        assert "def forward(" in _text(page) and "Float[Tensor, " in _text(page), name
        assert 'class="arithmatex"' in page.read_text(), f"{name}: no formula"


def test_conditioning_page_draws_the_conditioned_u_and_lists_every_fusion_step(built_site):
    site = built_site.check()
    page = (site / "conditioning.html").read_text()
    diagrams = [html.unescape(d) for d in re.findall(r'<pre class="mermaid"><code>(.*?)</code></pre>', page, re.S)]
    assert len(diagrams) == 1
    assert "class down1,up1,down2,up2 fuse_dynconv" in diagrams[0]
    assert "class down3,up3,down4,up4,mid fuse_xattn" in diagrams[0]
    rows = _table_rows(site / "conditioning.html")
    fusion_rows = [row for row in rows if row and row[2] in ("fuse_dynconv", "fuse_xattn")]
    assert len(fusion_rows) == 4 * 2 + 2                       # each level down and up, each middle segment
    assert ["down level 1, step 3 (fuse_dynconv)", "down1_fuse", "fuse_dynconv", "32,8,256,256"] == fusion_rows[0][:4]


def test_api_reference_shows_the_jaxtyping_shapes_in_signatures(built_site):
    text = _text(built_site.check() / "api.html")
    assert re.search(r'x:\s*Float\[Tensor,\s*"b c_in d h w"\]', text)
    assert re.search(r'x:\s*Float\[Tensor,\s*"b \{self\.in_channels\} d h w"\]', text)
    assert re.search(r'emb:\s*Float\[Tensor,\s*"b \{self\.emb_channels\}"\]', text)
    for name in ("UNet3D", "UNetSpec", "ResBlock3D", "MultiHeadSelfAttention3D", "shape_checks", "unet_diagram"):
        assert name in text


def test_performance_page_numbers_are_generated(built_site):
    rows = _table_rows(built_site.check() / "performance.html")
    # 8*256*256 tokens, 32/8 = 4 heads: 4 * 524288**2 float32 entries of 4 bytes = 4 TiB for one sample.
    assert ["level 1", "32", "8×256×256", "524,288", "4", "4.0 TiB", "no"] in rows
    assert ["level 4", "256", "1×32×32", "1,024", "32", "128.0 MiB", "yes"] in rows
    macs = next(row for row in rows if row[0] == "convolution multiply-accumulates per forward")
    assert float(macs[3]) < 1.0                       # planar kernels do less work than 3x3x3 everywhere


def test_notebooks_are_shown_executed(built_site):
    site = built_site.check()
    assert "transitions agree with the plan" in _text(site / "notebooks" / "01_quick_start.html")
    assert "ShapeContractError" in _text(site / "notebooks" / "02_shape_contracts.html")
    page = (site / "notebooks" / "03_your_own_model.html").read_text()
    assert "mean loss over the first 10 steps" in html.unescape(page) and "data:image/png;base64" in page
