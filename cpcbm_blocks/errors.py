"""The library's own exception types.

Every error the library raises on purpose derives from [`CpcbmError`][cpcbm_blocks.errors.CpcbmError],
so a caller (or a fuzzing test) can tell "the library refused this input, and said why" apart from a
crash inside torch. Each concrete type also derives from the builtin that fits it (`ValueError`,
`TypeError`, `RuntimeError`), so ordinary `except ValueError:` code keeps working.

Messages follow one rule: name the argument, the expected value, the actual value, and what to do.
"""

from jaxtyping import TypeCheckError


class CpcbmError(Exception):
    """Base class of every error raised on purpose by `cpcbm_blocks`."""


class SpecError(CpcbmError, ValueError):
    """A [`UNetSpec`][cpcbm_blocks.spec.UNetSpec] (or one of its parts) is invalid.

    Raised at construction of the spec, before any module exists.
    """


class InputError(CpcbmError, ValueError):
    """An input to a forward pass cannot work: wrong rank, channels, dtype, size or batch.

    Raised before any compute, so no time or memory is spent on a doomed call.
    """


class ShapeContractError(CpcbmError, TypeCheckError):
    """A block's jaxtyping shape contract was violated (an argument or its return value).

    The first line of the message names the block and the reason; the full jaxtyping report follows.
    """


class TraceMismatchError(CpcbmError, RuntimeError):
    """A transition the UNet actually performed differs from the one its plan expected."""


class CheckpointError(CpcbmError, ValueError):
    """Saved weights or a saved spec do not fit the model they are loaded into."""


class TraceNotationError(CpcbmError, ValueError):
    """A text in the seed's `h:` trace notation could not be parsed."""
