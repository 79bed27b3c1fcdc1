"""Session fixtures for the docs: execute every notebook once, then build the site once from them.

The notebooks are executed here, each timed, and the executed copies are handed to the site build
(`CPCBM_EXECUTED_NOTEBOOKS`, read by `docs/hooks/generate.py`), so CI runs each notebook once rather
than once for the tests and again for the site. A plain `mkdocs build` executes them itself.
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from ..conftest import ROOT

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NOTEBOOK_LIMIT_S = 60
"""Each notebook must run in under a minute on a CPU (issue 4)."""

BUILD_ENV = {"NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true"}
"""Silence the MkDocs-2 banners of Material and of the MkDocs plugin system."""

ARTIFACTS = ROOT / "artifacts"
"""Test artifacts (gitignored): screenshots of the built site, the build log."""


@dataclass(frozen=True)
class NotebookRun:
    path: Path
    executed: Path
    seconds: float
    error: str | None


@dataclass(frozen=True)
class BuiltSite:
    directory: Path
    seconds: float
    returncode: int
    log: str

    def check(self) -> Path:
        """The site folder, or a test failure that shows the end of the build log."""
        if self.returncode != 0:
            pytest.fail(f"mkdocs build --strict failed ({self.returncode}):\n{self.log[-4000:]}", pytrace=False)
        return self.directory


@pytest.fixture(scope="session")
def executed_notebooks(tmp_path_factory) -> dict[str, NotebookRun]:
    folder = tmp_path_factory.mktemp("executed-notebooks")
    runs = {}
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        client = NotebookClient(notebook, timeout=NOTEBOOK_LIMIT_S, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        started = time.perf_counter()
        error = None
        try:
            client.execute()
        except (CellExecutionError, TimeoutError) as caught:
            error = str(caught)
        seconds = time.perf_counter() - started
        executed = folder / path.name
        nbformat.write(notebook, executed)
        runs[path.name] = NotebookRun(path=path, executed=executed, seconds=seconds, error=error)
    return runs


@pytest.fixture(scope="session")
def built_site(tmp_path_factory, executed_notebooks) -> BuiltSite:
    site = tmp_path_factory.mktemp("site")
    folder = next(iter(executed_notebooks.values())).executed.parent
    env = {**os.environ, **BUILD_ENV, "CPCBM_EXECUTED_NOTEBOOKS": str(folder)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "mkdocs-build.log").write_text(f"{seconds:.1f} s, exit {result.returncode}\n{result.stderr}")
    return BuiltSite(directory=site, seconds=seconds, returncode=result.returncode, log=result.stderr)
