"""Every ```python block on every docs page runs (one fresh namespace per page, blocks in order).

A block with a title (```python title="train.py ...") is a script meant to run elsewhere (under
torchrun, on GPUs); the title says so on the page, and it is not run here.
"""

import re

import pytest

from ..conftest import ROOT

PAGES = sorted(p for p in (ROOT / "docs").rglob("*.md") if "hooks" not in p.parts)
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def test_docs_have_python_examples():
    with_examples = [p.relative_to(ROOT / "docs").as_posix() for p in PAGES if _PYTHON_BLOCK.search(p.read_text())]
    assert {"index.md", "install.md", "concepts.md", "performance.md", "blocks/resblock.md"} <= set(with_examples)


@pytest.mark.parametrize("page", [p for p in PAGES if _PYTHON_BLOCK.search(p.read_text())],
                         ids=lambda p: p.relative_to(ROOT / "docs").as_posix())
def test_python_examples_run(page, capsys):
    namespace: dict = {}
    for number, code in enumerate(_PYTHON_BLOCK.findall(page.read_text()), start=1):
        exec(compile(code, f"{page.name} block {number}", "exec"), namespace)  # noqa: S102 - the docs' own examples
