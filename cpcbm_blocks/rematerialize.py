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

A recipe that several others take as an argument (the FiLM map whose two chunks modulate a
feature) runs once per saved tensor being remade. With `rematerialized_saves(products=True)`, the
expensive tensors made by `recomputable_product` (convolution outputs) are recipes too: that is
gradient checkpointing at the granularity of tensors. In backward each such product runs once,
when the first saved tensor that needs it is remade, and is kept only until the last one has been.

Rules, as autograd's own saved tensors follow them:

* A recipe must be deterministic (no dropout) and its held arguments must not be modified in
  place afterwards; a changed version counter raises `RuntimeError` when the recipe runs. The same
  check covers every other tensor saved inside the context, which is held detached, as autograd
  holds it: autograd skips its own check for tensors that pass through a saved-tensor hook.
* A custom autograd `Function` takes part through `SavedApart(t)` instead of
  `ctx.save_for_backward(t)`: each such tensor is remade when the backward unpacks it, so the
  backward decides what exists at once (`Conv3d` lets its remade input go before it makes the input
  gradient; the FiLM modulation of `DynamicConvFusion3D` remakes γ and then u, never both).
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
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

__all__ = ["SavedApart", "can_rematerialize", "recomputable", "recomputable_product", "remaking_products",
           "rematerialized_saves", "rematerializing", "saves_apart"]


class _Recipe:
    """How to make one tensor again: `fn` over held tensors, constants and other recipes' results."""

    __slots__ = ("__weakref__", "cached", "consumers", "expensive", "fn", "held", "leaves", "pending", "spec")

    def __init__(self, fn: Callable[..., Tensor], leaves: list[Any], spec: Any, held: list[tuple[Tensor, int]], *,
                 expensive: bool) -> None:
        self.fn, self.leaves, self.spec, self.held, self.expensive = fn, leaves, spec, held, expensive
        self.consumers = 0  # other recipes that take this one's result (or a view of it) as an argument
        # An expensive recipe (a convolution, under `rematerialized_saves(products=True)`) runs once in
        # backward: its result is kept from its first use until the last saved tensor that needs it is made.
        self.pending = 0
        self.cached: Tensor | None = None

    def needs(self) -> list["_Recipe"]:
        """This recipe and every recipe it remakes its arguments through, expensive ones only."""
        found = [self] if self.expensive else []
        for leaf in self.leaves:
            if isinstance(leaf, _Remade):
                found += leaf.recipe.needs()
        return found

    def __call__(self) -> Tensor:
        if self.cached is not None:
            return self.cached
        memo = _remaking.results if self.consumers > 1 else None
        if memo is not None and id(self) in memo:
            return memo[id(self)]
        for tensor, version in self.held:
            if tensor._version != version:
                raise RuntimeError(
                    f"recomputable({getattr(self.fn, '__name__', type(self.fn).__name__)}): an argument of shape "
                    f"{tuple(tensor.shape)} was modified in place after the forward, so the saved tensor "
                    "cannot be remade for backward. Do not modify it in place, or compute outside "
                    "rematerialized_saves().")
        # A product's arguments are remade in a scope of their own: the product is cached once made, so what
        # was shared while making them (the input of a chain of steps, say) goes with them, not at the end
        # of the whole saved tensor's remake; a cheap recipe that something later shares runs again.
        outer = _remaking.results
        if self.expensive and outer is not None:
            _remaking.results = {}
        try:
            args, kwargs = tree_unflatten([leaf.remake() if isinstance(leaf, _Remade) else leaf
                                           for leaf in self.leaves], self.spec)
        finally:
            _remaking.results = outer
        out = self.fn(*args, **kwargs)
        if memo is not None:
            memo[id(self)] = out
        if self.expensive and self.pending > 0:
            self.cached = out
        return out


class _Remade:
    """A tensor as its recipe and the view of the recipe's result it was (the whole result, or a chunk)."""

    __slots__ = ("offset", "recipe", "shape", "stride")

    def __init__(self, recipe: _Recipe, tensor: Tensor) -> None:
        self.recipe, self.shape, self.stride, self.offset = (recipe, tuple(tensor.shape), tensor.stride(),
                                                             tensor.storage_offset())

    def remake(self) -> Tensor:
        base = self.recipe()
        if tuple(base.shape) == self.shape and base.stride() == self.stride and base.storage_offset() == self.offset:
            return base
        return base.as_strided(self.shape, self.stride, self.offset)


class _Packed(_Remade):
    """A tensor saved for backward as its recipe: remade without grad when a backward operator needs it.

    While it is remade, a recipe that several others take as an argument (a FiLM map whose two
    chunks feed two recipes, say) runs once: `_remaking.results` keeps its result until the
    saved tensor is made, then lets it go.
    """

    __slots__ = ("expensive",)

    def __init__(self, recipe: _Recipe, tensor: Tensor, *, expensive: list[_Recipe]) -> None:
        super().__init__(recipe, tensor)
        self.expensive = expensive  # the products it is remade through, each kept until its last saved use
        for needed in expensive:
            needed.pending += 1

    def remake(self) -> Tensor:
        outermost = _remaking.results is None
        if outermost:
            _remaking.results = {}
        try:
            with torch.no_grad():
                return super().remake()
        finally:
            if outermost:
                _remaking.results = None
            for needed in self.expensive:  # the last saved tensor that needed it has been made
                needed.pending -= 1
                if needed.pending <= 0:
                    needed.cached = None


class _Held:
    """A saved tensor without a recipe, held as autograd holds it: its data, and its version to check.

    Detached, because a saved-tensor hook that hands autograd back the tensor itself closes a cycle
    where an operator saves one of its own outputs (ReLU its result, GroupNorm its statistics):
    output -> grad_fn -> saved output, through C++ references Python's collector cannot see. Autograd
    breaks that cycle itself when no hook is active; under a hook the node and everything it saved
    would outlive a forward whose output is dropped without a backward (1 MiB per residual block
    per forward at 32x32, measured). Autograd gives the unpacked data its grad_fn back, so double
    backward is unaffected. And autograd does not check the version of a hooked tensor, so this
    does, as it would: a tensor modified in place after it was saved fails the backward instead of
    giving wrong gradients."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor, self.version = tensor.detach(), tensor._version

    def unpack(self, who: str) -> Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(f"{who}: a tensor of shape {tuple(self.tensor.shape)} saved for backward was "
                               "modified in place after the forward (version "
                               f"{self.tensor._version}, saved at {self.version}). Do not modify it in place "
                               "before backward, or make a copy to modify.")
        return self.tensor


class _Remaking(threading.local):
    results: dict[int, Tensor] | None = None  # the results of shared recipes, while one saved tensor is remade


_remaking = _Remaking()


class _Registry:
    """Storage key -> recipe, for the tensors made by `recomputable` while the context is active."""

    def __init__(self, *, products: bool) -> None:
        self.recipes: dict[int, _Recipe] = {}
        self.products = products

    def add(self, tensor: Tensor, recipe: _Recipe) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        self.recipes[key] = recipe
        # The key names a storage only while it lives; a new tensor may reuse the address later.
        weakref.finalize(storage, self.recipes.pop, key, None)

    def recipe_of(self, tensor: Tensor) -> _Recipe | None:
        return self.recipes.get(tensor.untyped_storage()._cdata)

    def pack(self, tensor: Tensor) -> "_Packed | _Held":
        recipe = self.recipe_of(tensor)
        if recipe is None:
            return _Held(tensor)
        # Without products there are no expensive recipes: skip walking the recipe's arguments.
        return _Packed(recipe, tensor, expensive=recipe.needs() if self.products else [])

    @staticmethod
    def unpack(packed: "_Packed | _Held") -> Tensor:
        return packed.remake() if isinstance(packed, _Packed) else packed.unpack("rematerialized_saves")


_active: list[_Registry] = []


def rematerializing() -> bool:
    """True inside `rematerialized_saves()` where it took effect."""
    return bool(_active)


def _applies() -> bool:
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not any(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")))


def remaking_products() -> bool:
    """True inside `rematerialized_saves(products=True)` where it took effect: gradient checkpointing,
    where memory comes before time."""
    return bool(_active) and _active[-1].products


def saves_apart() -> bool:
    """Whether a `SavedApart` made here would keep a recipe: inside `rematerialized_saves()` where it took
    effect, with no other saved-tensor hook (a `torch.utils.checkpoint` region) opened inside it.

    A custom autograd `Function` saves through `SavedApart` only where this is true; elsewhere it
    saves with `ctx.save_for_backward`, which such a region would see."""
    if not _active or torch.compiler.is_compiling():
        return False
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top is not None and top[0] == _active[-1].pack


def can_rematerialize() -> bool:
    """Whether `rematerialized_saves()` would take effect here: grad on, no autocast, not compiling,
    and no other saved-tensor hook (such as a `torch.utils.checkpoint` region) active.

    Callers with a fallback (UNet3D uses a selective checkpoint) ask this first.
    """
    return bool(_active) or (_applies() and torch._C._autograd._top_saved_tensors_default_hooks(False) is None)


@contextlib.contextmanager
def rematerialized_saves(*, products: bool = False) -> Iterator[None]:
    """Save the tensors made by `recomputable` inside this block as their recipes (see the module docs).

    With `products=True`, those made by `recomputable_product` (convolution outputs) too: the block
    then holds about what `torch.utils.checkpoint` would, its inputs, and in backward runs each
    product once, keeping it only until the last saved tensor that needs it has been made. That is
    gradient checkpointing without running again what no backward needs.

    Nested uses share the outermost one's registry and setting. Where another saved-tensor hook is
    already active (a `torch.utils.checkpoint` region, say), where grad is off, under autocast or
    while compiling, it does nothing: those tensors are saved as usual.
    """
    if _active or not can_rematerialize():
        yield
        return
    registry = _Registry(products=products)
    _active.append(registry)
    try:
        with torch.autograd.graph.saved_tensors_hooks(registry.pack, registry.unpack):
            yield
    finally:
        _active.pop()


def recomputable(fn: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
    """`fn(*args, **kwargs)`; inside `rematerialized_saves()`, saved for backward as this call.

    `fn` must return one tensor and be deterministic. Tensor arguments made by `recomputable` (or
    views of them, such as chunks) are remade through their own recipes; every other tensor
    argument is held by the recipe (as autograd would hold it) and must not be modified in place
    before backward.
    """
    return _record(fn, args, kwargs, expensive=False)


def recomputable_product(fn: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
    """`fn(*args, **kwargs)` for an expensive `fn` (a convolution): a recipe only under
    `rematerialized_saves(products=True)`, where it runs at most once more, in backward.

    Elsewhere (including plain `rematerialized_saves()`) the result is an ordinary tensor, saved as
    usual by whichever operator needs it.
    """
    return _record(fn, args, kwargs, expensive=True)


class SavedApart:
    """One tensor that a custom autograd `Function` keeps for its backward and unpacks on its own.

    `ctx.saved_tensors` hands back every saved tensor at once, so a backward that needs two remade
    tensors one after the other would hold both, and one that could let a remade tensor go before
    making the next gradient cannot. Kept as `SavedApart(t)` inside `rematerialized_saves()`, a
    tensor made by `recomputable` (or `recomputable_product`) is kept as its recipe and remade when
    `unpack()` is called; any other tensor is held, as autograd would hold it, with the same check
    that it was not modified in place. Like autograd's saved tensors it is freed once unpacked,
    unless the backward keeps the graph (`retain_graph=True`).

    Use it only where `saves_apart()` is true (in a `Function`'s forward or `setup_context`, for a call
    made with grad on); elsewhere save with `ctx.save_for_backward`, so that other saved-tensor hooks
    (a `torch.utils.checkpoint` region) see the tensor.
    """

    __slots__ = ("_kept",)

    def __init__(self, tensor: Tensor) -> None:
        self._kept: _Packed | _Held | None = _active[-1].pack(tensor) if _active else _Held(tensor)

    def unpack(self) -> Tensor:
        kept = self._kept
        if kept is None:
            raise RuntimeError("SavedApart: the saved tensor was already freed by an earlier backward through this "
                               "graph. Pass retain_graph=True to the first backward to go through it again.")
        # Freed as autograd frees its saved tensors once a node's backward ran (unless the graph is kept):
        # the Function's ctx, which holds this, lives until the whole graph goes.
        if not _keeps_graph():
            self._kept = None
        return kept.remake() if isinstance(kept, _Packed) else kept.unpack("SavedApart")


def _keeps_graph() -> bool:
    """Whether the running backward keeps the graph (`retain_graph=True`); torch.utils.checkpoint asks the same."""
    return torch._C._autograd._get_current_graph_task_keep_graph()


def _record(fn: Callable[..., Tensor], args: tuple, kwargs: dict, *, expensive: bool) -> Tensor:
    out = fn(*args, **kwargs)
    if not _active or not _applies() or (expensive and not _active[-1].products):
        return out
    registry = _active[-1]
    leaves, spec = tree_flatten((args, kwargs))
    held: list[tuple[Tensor, int]] = []
    for index, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor):
            continue
        made_by = registry.recipe_of(leaf)
        if made_by is not None:
            made_by.consumers += 1
            leaves[index] = _Remade(made_by, leaf)
        else:
            leaves[index] = leaf.detach()
            held.append((leaves[index], leaf._version))
    registry.add(out, _Recipe(fn, leaves, spec, held, expensive=expensive))
    return out
