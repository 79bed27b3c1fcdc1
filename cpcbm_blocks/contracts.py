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
* The error's first line names the argument (or the return value), the expected annotation with
  the sizes it refers to filled in, the actual shape and the reason, which jaxtyping spreads over
  its report and the exception chain.
* Floating-point arguments are also checked for the device and dtype of the block's weights (or,
  for a function, of its first floating-point argument) before any compute: a float64 volume into
  a float32 block would otherwise fail deep inside the first convolution or matrix product.
"""

import functools
import inspect
import os
import re
import sys
import threading
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from beartype import beartype
from beartype.roar import BeartypeCallHintViolation
from jaxtyping import Float, TypeCheckError, jaxtyped
from torch import nn

from cpcbm_blocks.arguments import check_bool
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
    # strictly a bool: bool("false") is True, so a string would silently leave the checks on
    _switch.enabled = check_bool("set_shape_checks: enabled", enabled, error=InputError)


@contextmanager
def shape_checks(enabled: bool) -> Iterator[None]:
    """Context manager form of [`set_shape_checks`][cpcbm_blocks.contracts.set_shape_checks].

    ```python
    with shape_checks(False):
        eps = model(x, t)   # no jaxtyping checks, no per-transition trace assertion
    ```
    """
    before = _switch.enabled
    _switch.enabled = check_bool("shape_checks: enabled", enabled, error=InputError)
    try:
        yield
    finally:
        _switch.enabled = before


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_symbolic_tracing()


def checks_active() -> bool:
    """True when checks should run now: compiled in, switched on, and not compiling/exporting/tracing."""
    return CHECKS_AT_IMPORT and _switch.enabled and not _tracing()


_PARAMETER = re.compile(r"whilst typechecking parameter '(\w+)'")
_ACTUAL = re.compile(r"^Actual value: (.*)$", re.M)
_EXPECTED = re.compile(r"^Expected type: (.*?)\.?$", re.M)
_AXES = re.compile(r"axis annotation are as follows\.\n((?:\w+=.*\n?)+)")
_SELF_FIELD = re.compile(r"\{self\.(\w+)(?:\[(\d+)\])?\}")


def _first_line(where: str, error: TypeCheckError, owner: object | None) -> str:
    """`<where>: <argument>: expected <annotation, sizes filled in>, got <shape> (<reason>)` from jaxtyping's report."""
    report = str(error)
    parameter = _PARAMETER.search(report)
    subject = parameter.group(1) if parameter else "the return value"
    expected, actual = _EXPECTED.search(report), _ACTUAL.search(report)
    if expected is None or actual is None:
        return f"{where}: {_reason(error)}"
    annotation = _SELF_FIELD.sub(lambda m: _field_value(owner, m), expected.group(1))
    annotation = annotation.replace("<class '", "").replace("'>", "").replace("jaxtyping.", "")
    axes = _AXES.search(report)
    bound = f" (sizes bound so far: {', '.join(axes.group(1).split())})" if axes else ""
    reason = _SELF_FIELD.sub(lambda m: m.group(1) + (f"[{m.group(2)}]" if m.group(2) else ""), _reason(error))
    informative = "tensor(" not in reason and "<protocol" not in reason and "<class" not in reason
    actual_text = actual.group(1).removesuffix("(torch)")
    because = f" ({reason})" if informative else ""
    # a size the block was built without (emb_channels=None, say): the argument can only be None
    unset = [m.group(1) for m in _SELF_FIELD.finditer(expected.group(1))
             if owner is not None and hasattr(owner, m.group(1)) and getattr(owner, m.group(1)) is None]
    if unset:
        because += f" (this block was built with {unset[0]}=None, so {subject} must be None)"
    return f"{where}: {subject}: expected {annotation}{bound}, got {actual_text}{because}"


def _field_value(owner: object | None, match: re.Match) -> str:
    value = getattr(owner, match.group(1), None)
    if value is not None and match.group(2) is not None:
        value = value[int(match.group(2))]
    return match.group(0) if value is None else str(value)


def _is_float_array(annotation: object) -> bool:
    """True for `Float[Tensor, ...]`, alone or in a union such as `Float[Tensor, ...] | None`."""
    members = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, type(int | None)) else (
        annotation,)
    return any(getattr(member, "dtype", None) is Float for member in members)


def _float_parameters(fn: Callable) -> tuple[inspect.Signature, tuple[str, ...]]:
    signature = inspect.signature(fn)
    return signature, tuple(name for name, parameter in signature.parameters.items()
                            if _is_float_array(parameter.annotation))


def _check_float_arguments(where: str, signature: inspect.Signature, names: tuple[str, ...], args: tuple,
                           kwargs: dict) -> None:
    """Every floating-point tensor argument on the device and in the dtype of the block's weights (or the first one)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return  # the call itself raises the usual TypeError
    tensors = [(name, bound.arguments[name]) for name in names
               if isinstance(bound.arguments.get(name), torch.Tensor) and bound.arguments[name].is_floating_point()]
    owner = args[0] if args and isinstance(args[0], nn.Module) else None
    weights = [] if owner is None else [p for p in owner.parameters() if p.is_floating_point()]
    if weights:
        # any dtype among the weights: mixed precision keeps some (norms, say) in float32
        for name, value in tensors:
            check_device_and_dtype(name, value, like=weights[0], where=where, also={p.dtype for p in weights})
    elif tensors:
        first_name, first = tensors[0]
        for name, value in tensors[1:]:
            if value.device != first.device or value.dtype != first.dtype:
                raise InputError(f"{where}: {name}: expected a tensor like {first_name} ({first.dtype} on "
                                 f"{first.device}), got {value.dtype} on {value.device}. Convert it with "
                                 f"{name}.to({first_name}).")


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
    signature, float_names = _float_parameters(fn)

    def wrapper(*args, **kwargs):
        if not _switch.enabled or _tracing():
            return fn(*args, **kwargs)
        if float_names:
            _check_float_arguments(fn.__qualname__, signature, float_names, args, kwargs)
        try:
            return checked(*args, **kwargs)
        except ShapeContractError:
            raise
        except TypeCheckError as error:
            owner = args[0] if args else None
            raise ShapeContractError(f"{_first_line(fn.__qualname__, error, owner)}. Pass tensors whose shapes "
                                     f"match the annotation; jaxtyping's report follows.\n{error}") from error

    name = "shape_checked_" + fn.__qualname__.replace(".", "_").replace("<", "_").replace(">", "_")
    renamed = {"co_name": name, **({"co_qualname": name} if sys.version_info >= (3, 11) else {})}
    wrapper.__code__ = wrapper.__code__.replace(**renamed)
    return functools.wraps(fn)(wrapper)  # type: ignore[return-value]


def check_device_and_dtype(name: str, value: torch.Tensor, *, like: torch.Tensor, where: str = "",
                           also: set[torch.dtype] = frozenset()) -> None:
    """Refuse a floating-point input that is not on the device of the weights `like`, or not of their dtype.

    `also` adds dtypes to accept (those of a block's other weights). Under `torch.autocast` for that
    device, every floating dtype but float64 is accepted too: autocast casts them per operation.
    Without this check, torch fails deep inside the first layer ("mat1 and mat2 must have the same
    dtype", "Input type (double) and bias type (float) should be the same").
    `where` (a block's method, say) prefixes the message.
    """
    prefix = f"{where}: " if where else ""
    if value.device != like.device:
        raise InputError(f"{prefix}{name}: expected a tensor on the model's device {like.device}, got one on {value.device}. "
                         f"Move it with {name}.to({str(like.device)!r}), or the model with model.to({name}.device).")
    allowed = {like.dtype, *also}
    device_type = value.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if autocast:
        allowed |= {torch.float32, torch.float16, torch.bfloat16}
    if value.dtype not in allowed:
        source = "the model's weights" + (" or what autocast casts" if autocast else "")
        raise InputError(f"{prefix}{name}: expected dtype {' or '.join(sorted(str(d) for d in allowed))} ({source}), "
                         f"got {value.dtype}. Convert it with {name}.to({like.dtype}), cast the model with "
                         f"model.to({value.dtype})" + ("." if autocast else ", or run under torch.autocast."))
