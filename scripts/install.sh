#!/usr/bin/env bash
# Install cpcbm_blocks with its development, docs and interop extras (diffusers, for the interop tests)
# into the active Python environment.
# torch comes first and pinned: `torch==2.13.0` is the CPU build; an unpinned torch pulled in by
# another package would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev,docs,interop]"
