"""Project rules that are cheap to check mechanically (style guide P5, P10)."""

import inspect
import re

import pytest

import cpcbm_blocks
from cpcbm_blocks import (Conv3d, Downsample3D, MultiHeadSelfAttention3D, OutputHead, ResBlock3D, TimestepEmbedding,
                          Upsample3D)

from .conftest import ROOT

BLOCKS = [ResBlock3D, Downsample3D, Upsample3D, MultiHeadSelfAttention3D, TimestepEmbedding, OutputHead]
AXIS_VOCABULARY = {"b", "c", "c_in", "c_out", "c_skip", "d", "h", "w", "d_out", "h_out", "w_out", "n", "m", "heads", "e"}


def _sources():
    return sorted((ROOT / "cpcbm_blocks").rglob("*.py"))


def test_no_postponed_annotations_anywhere_in_the_package():
    offenders = [p.name for p in _sources() if re.search(r"^from __future__ import annotations", p.read_text(), re.M)]
    assert offenders == []


def test_jaxtyped_is_used_only_inside_the_shape_checked_decorator():
    uses = [(p.name, n) for p in _sources() for n in re.findall(r"jaxtyped\(", p.read_text())]
    assert uses == [("contracts.py", "jaxtyped(")]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.__name__)
def test_every_block_has_a_keyword_only_constructor(block):
    parameters = list(inspect.signature(block.__init__).parameters.values())[1:]
    assert parameters and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)


@pytest.mark.parametrize("block", [*BLOCKS, Conv3d], ids=lambda b: b.__name__)
def test_every_block_forward_is_annotated_with_jaxtyping_shapes_from_the_axis_vocabulary(block):
    annotations = inspect.get_annotations(block.forward)
    tensor_annotations = [str(a) for a in annotations.values() if "Tensor" in str(a)]
    assert "return" in annotations and tensor_annotations
    for text in tensor_annotations:
        for shape in re.findall(r"Tensor, '([^']*)'", text):
            for axis in shape.split():
                name = re.sub(r"\{[^}]*\}", "", axis)
                name = re.split(r"[*/+\-]", name)[0]
                assert name == "" or name in AXIS_VOCABULARY, f"{block.__name__}: axis {axis!r} not in the vocabulary"


def test_checked_blocks_go_through_the_projects_decorator():
    if not cpcbm_blocks.contracts.CHECKS_AT_IMPORT:
        pytest.skip("checks compiled out by CPCBM_SHAPE_CHECKS=0")
    for block in BLOCKS:
        assert block.forward.__code__.co_name.startswith("shape_checked_"), block.__name__
