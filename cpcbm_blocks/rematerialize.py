"""Rematerialised saves: autograd keeps the recipe of a cheap tensor, not the tensor.

A residual block saves, for backward, the input of every GroupNorm, SiLU and convolution in it:
at the full 256x256 resolution of the default UNet that is six or seven 64-128 MiB tensors, of
which only the convolution outputs were expensive to make. `torch.utils.checkpoint` with a
selective policy ([`recompute_memory_bound`][cpcbm_blocks.recompute.recompute_memory_bound]) drops
the cheap ones, but it must keep the output of every convolution it does not want to run again,
and when the gradient arrives it remakes everything it dropped at once.

Here the unit is one tensor, not a region. Inside `rematerialized_saves()`, a tensor made by
`recomputable(fn, *args)` is saved for backward (by whichever operator saves it: a norm, an
activation, a convolution) as *how to make it*: `fn` and its arguments. When backward needs it,
the recipe runs under `no_grad` and the tensor lives only while that one backward operator runs.
Arguments that are themselves recomputable are remade through their own recipes, so a chain
`silu(group_norm(h + e))` holds only `h` and `e`. What a residual block then holds for backward is
its input and the output of its first convolution; the output of its second convolution, which no
backward needs, is not held at all (a selective checkpoint would cache it).

Rules, as autograd's own saved tensors follow them:

* A recipe must be deterministic (no dropout) and its held arguments must not be modified in
  place afterwards; a changed version counter raises `RuntimeError` when the recipe runs.
* It applies in eager training only: without grad, under autocast (a saved tensor is then a cast
  copy), under `torch.compile` (the partitioner decides what to save), or inside another
  saved-tensor hook such as `torch.utils.checkpoint`, `recomputable(fn, *args)` is `fn(*args)` and
  `rematerialized_saves()` does nothing.

```python
with rematerialized_saves():
    a = recomputable(F.silu, recomputable(norm, x))
    y = conv(a)            # conv saves `a` as its recipe: silu(norm(x)), with x held
loss(y).backward()         # remakes `a` when conv's backward needs it, then frees it
```
"""

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["can_rematerialize", "recomputable", "rematerialized_saves", "rematerializing"]


class _Registry:
    """Storage key -> recipe, for the tensors made by `recomputable` while the context is active."""

    def __init__(self) -> None:
        self.recipes: dict[int, Callable[[], Tensor]] = {}

    def add(self, tensor: Tensor, recipe: Callable[[], Tensor]) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        self.recipes[key] = recipe
        # The key names a storage only while it lives; a new tensor may reuse the address later.
        weakref.finalize(storage, self.recipes.pop, key, None)

    def pack(self, tensor: Tensor) -> Any:
        recipe = self.recipes.get(tensor.untyped_storage()._cdata)
        if recipe is None:
            return tensor
        return _Packed(recipe, tuple(tensor.shape), tensor.stride(), tensor.storage_offset())

    @staticmethod
    def unpack(packed: Any) -> Tensor:
        return packed.remake() if isinstance(packed, _Packed) else packed


class _Packed:
    """A saved tensor as its recipe and the view of the recipe's result that was saved."""

    __slots__ = ("offset", "recipe", "shape", "stride")

    def __init__(self, recipe: Callable[[], Tensor], shape: tuple[int, ...], stride: tuple[int, ...],
                 offset: int) -> None:
        self.recipe, self.shape, self.stride, self.offset = recipe, shape, stride, offset

    def remake(self) -> Tensor:
        with torch.no_grad():
            base = self.recipe()
        if tuple(base.shape) == self.shape and base.stride() == self.stride and base.storage_offset() == self.offset:
            return base
        return base.as_strided(self.shape, self.stride, self.offset)


_active: list[_Registry] = []


def rematerializing() -> bool:
    """True inside `rematerialized_saves()` where it took effect."""
    return bool(_active)


def _applies() -> bool:
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")))


def can_rematerialize() -> bool:
    """Whether `rematerialized_saves()` would take effect here: grad on, no autocast, not compiling,
    and no other saved-tensor hook (such as a `torch.utils.checkpoint` region) active.

    Callers with a fallback (UNet3D uses a selective checkpoint) ask this first.
    """
    return bool(_active) or (_applies() and torch._C._autograd._top_saved_tensors_default_hooks(False) is None)


@contextlib.contextmanager
def rematerialized_saves() -> Iterator[None]:
    """Save the tensors made by `recomputable` inside this block as their recipes (see the module docs).

    Nested uses share one registry. Where another saved-tensor hook is already active (a
    `torch.utils.checkpoint` region, say), where grad is off, under autocast or while compiling,
    it does nothing: those tensors are saved as usual.
    """
    if _active or not can_rematerialize():
        yield
        return
    registry = _Registry()
    _active.append(registry)
    try:
        with torch.autograd.graph.saved_tensors_hooks(registry.pack, registry.unpack):
            yield
    finally:
        _active.pop()


def recomputable(fn: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
    """`fn(*args, **kwargs)`; inside `rematerialized_saves()`, saved for backward as this call.

    `fn` must return one tensor and be deterministic. Tensor arguments made by `recomputable` are
    remade through their own recipes; every other tensor argument is held by the recipe (as
    autograd would hold it) and must not be modified in place before backward.
    """
    out = fn(*args, **kwargs)
    if not _active or not _applies():
        return out
    registry = _active[-1]
    held: list[tuple[Tensor, int]] = []

    def getter(value: Any) -> Any:
        if not isinstance(value, Tensor):
            return value
        recipe = registry.recipes.get(value.untyped_storage()._cdata)
        if recipe is not None and value.is_contiguous() and value.storage_offset() == 0:
            return _Remade(recipe)
        detached = value.detach()
        held.append((detached, value._version))
        return detached

    getters = tree_map(getter, (args, kwargs))
    if any(isinstance(leaf, _Remade) for leaf in tree_leaves(getters)):
        def remake_arguments() -> tuple:
            return tree_map(lambda g: g.recipe() if isinstance(g, _Remade) else g, getters)
    else:
        def remake_arguments() -> tuple:
            return getters

    def recipe() -> Tensor:
        for tensor, version in held:
            if tensor._version != version:
                raise RuntimeError(
                    f"recomputable({getattr(fn, '__name__', type(fn).__name__)}): an argument of shape "
                    f"{tuple(tensor.shape)} was modified in place after the forward, so the saved tensor "
                    "cannot be remade for backward. Do not modify it in place, or compute outside "
                    "rematerialized_saves().")
        call_args, call_kwargs = remake_arguments()
        return fn(*call_args, **call_kwargs)

    registry.add(out, recipe)
    return out


class _Remade:
    """An argument that is itself recomputable: remade through its recipe when needed."""

    __slots__ = ("recipe",)

    def __init__(self, recipe: Callable[[], Tensor]) -> None:
        self.recipe = recipe
