"""Record the transitions a UNet actually performs, and compare them with its plan.

```python
with record_trace(model) as trace:
    model(x, t)
assert trace.transitions == plan(model.spec, tuple(x.shape)).transitions
```

The recording is done by the UNet's own step loop, so it sees exactly the shapes that flowed.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from cpcbm_blocks.plan import Transition

__all__ = ["RecordedTrace", "record_trace"]


@dataclass
class RecordedTrace:
    """The transitions observed during the forward passes run inside [`record_trace`][cpcbm_blocks.trace.record_trace]."""

    transitions: list[Transition] = field(default_factory=list)


@contextmanager
def record_trace(model) -> Iterator[RecordedTrace]:
    """Record every transition `model` (a [`UNet3D`][cpcbm_blocks.unet.UNet3D]) performs inside the block."""
    trace = RecordedTrace()
    previous = model._trace_sink
    model._trace_sink = trace.transitions
    try:
        yield trace
    finally:
        model._trace_sink = previous
