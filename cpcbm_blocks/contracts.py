"""Runtime shape contracts: the one decorator that checks jaxtyping annotations, and its switches.

Every block annotates `forward` with jaxtyping shapes such as `Float[Tensor, "b {self.channels} d h w"]`.
[`shape_checked`][cpcbm_blocks.contracts.shape_checked] turns those annotations into checks made by
beartype on every eager call. The measurements behind this design are in the project's
`shape_contracts.md` note:

* `CPCBM_SHAPE_CHECKS=0` in the environment **before import** makes the decorator return the bare
  function: no wrapper exists, so the cost is exactly zero.
* [`set_shape_checks`][cpcbm_blocks.contracts.set_shape_checks] and the context manager
  [`shape_checks`][cpcbm_blocks.contracts.shape_checks] switch checks at run time (one attribute
  read per call when off).
* Under `torch.compile`, `torch.export` and fx tracing the checks are skipped automatically: a plain
  `jaxtyped` wrapper raises false errors there (`isinstance` against jaxtyping types is False inside
  dynamo; pytorch#122093).
* Each decorated function gets its own code object, so torch.compile's per-code recompile limit is
  not shared by every block (jaxtyping#384).
* The error's first line carries the reason, which jaxtyping only puts deep in the exception chain.
"""

import functools
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from beartype import beartype
from beartype.roar import BeartypeCallHintViolation
from jaxtyping import TypeCheckError, jaxtyped

from cpcbm_blocks.errors import InputError, ShapeContractError

__all__ = ["CHECKS_AT_IMPORT", "check_device_and_dtype", "checks_active", "set_shape_checks", "shape_checked",
           "shape_checks"]

_OFF_VALUES = ("0", "false", "no", "off")

CHECKS_AT_IMPORT: bool = os.environ.get("CPCBM_SHAPE_CHECKS", "1").strip().lower() not in _OFF_VALUES
"""Whether shape checks were compiled in when the package was imported (`CPCBM_SHAPE_CHECKS`)."""


class _Switch(threading.local):
    enabled: bool = True


_switch = _Switch()

F = TypeVar("F", bound=Callable)


def set_shape_checks(enabled: bool) -> None:
    """Switch shape checks on or off at run time, for the calling thread.

    Has no effect when the package was imported with `CPCBM_SHAPE_CHECKS=0`: then no check exists.
    """
    _switch.enabled = bool(enabled)


@contextmanager
def shape_checks(enabled: bool) -> Iterator[None]:
    """Context manager form of [`set_shape_checks`][cpcbm_blocks.contracts.set_shape_checks].

    ```python
    with shape_checks(False):
        eps = model(x, t)   # no jaxtyping checks, no per-transition trace assertion
    ```
    """
    before = _switch.enabled
    _switch.enabled = bool(enabled)
    try:
        yield
    finally:
        _switch.enabled = before


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()


def checks_active() -> bool:
    """True when checks should run now: compiled in, switched on, and not compiling/exporting/tracing."""
    return CHECKS_AT_IMPORT and _switch.enabled and not _tracing()


def _reason(exc: BaseException) -> str:
    """The sentence that says *why* a jaxtyping check failed (it sits in the exception chain)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, BeartypeCallHintViolation):
            message = str(e)
            at = message.rfind(", as ")
            return message[at + 2 :].rstrip(".") if at >= 0 else message.splitlines()[0]
        if isinstance(e, (AttributeError, NameError)):
            return f"an annotation could not be evaluated: {type(e).__name__}: {e}"
        e = e.__cause__ or e.__context__
    return str(exc).splitlines()[0]


def shape_checked(fn: F) -> F:
    """Check `fn`'s jaxtyping annotations with beartype on every eager call.

    The project's only way to turn annotations into checks; a plain `jaxtyped` decorator in library code is
    forbidden because it breaks `torch.compile`. See the module docstring for the switches.
    """
    if not CHECKS_AT_IMPORT:
        return fn
    checked = jaxtyped(typechecker=beartype)(fn)

    def wrapper(*args, **kwargs):
        if not _switch.enabled or _tracing():
            return fn(*args, **kwargs)
        try:
            return checked(*args, **kwargs)
        except ShapeContractError:
            raise
        except TypeCheckError as error:
            raise ShapeContractError(f"{fn.__qualname__}: {_reason(error)}. Pass tensors whose shapes match the "
                                     f"annotation reported below.\n{error}") from error

    name = "shape_checked_" + fn.__qualname__.replace(".", "_").replace("<", "_").replace(">", "_")
    renamed = {"co_name": name, **({"co_qualname": name} if sys.version_info >= (3, 11) else {})}
    wrapper.__code__ = wrapper.__code__.replace(**renamed)
    return functools.wraps(fn)(wrapper)  # type: ignore[return-value]


def check_device_and_dtype(name: str, value: torch.Tensor, *, like: torch.Tensor) -> None:
    """Refuse a floating-point input that is not on the device of the weights `like`, or not of their dtype.

    Under `torch.autocast` for that device, float32 and the autocast dtype are accepted too (autocast
    casts them per operation). Without this check, torch fails deep inside the first layer ("mat1 and
    mat2 must have the same dtype", "Input type (double) and bias type (float) should be the same").
    """
    if value.device != like.device:
        raise InputError(f"{name}: expected a tensor on the model's device {like.device}, got one on {value.device}. "
                         f"Move it with {name}.to({str(like.device)!r}), or the model with model.to({name}.device).")
    allowed = {like.dtype}
    device_type = value.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        allowed |= {torch.float32, torch.get_autocast_dtype(device_type)}
    if value.dtype not in allowed:
        raise InputError(f"{name}: expected dtype {' or '.join(sorted(str(d) for d in allowed))} (the model's weights"
                         f"{' or the autocast dtype' if len(allowed) > 1 else ''}), got {value.dtype}. Convert it with "
                         f"{name}.to({like.dtype}), cast the model with model.to({value.dtype}), or run under torch.autocast.")
