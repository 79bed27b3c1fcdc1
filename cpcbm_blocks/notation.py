"""Parse and render the seed's `h:` trace notation.

The notation (from `CPC_BM_model.md`) writes the UNet as three sections, `Down-{...}`, `Mid-{...}`
and `Up-{...}`, each a chain of `C,D,H,W` shapes joined by `->(op)->` arrows. Square brackets group a
level (or a middle segment) and `A + B` is a concatenation of the main path `A` with a skip `B`.
Whitespace and line breaks carry no meaning. We add an optional `Head-{...}` section for the output
head, the one step beyond the seed's trace.

[`parse_trace`][cpcbm_blocks.notation.parse_trace] turns such a text into the same keys that
[`Transition.key`][cpcbm_blocks.plan.Transition.key] gives, so a documented trace and a
[`plan`][cpcbm_blocks.plan.plan] compare with `==`.
[`render_trace`][cpcbm_blocks.notation.render_trace] goes the other way.
"""

import re

from cpcbm_blocks.errors import TraceNotationError
from cpcbm_blocks.layout import Section
from cpcbm_blocks.plan import Plan, Shape, Transition

__all__ = ["TraceKey", "parse_trace", "render_trace", "strip_whitespace"]

TraceKey = tuple[str, int, int, str, Shape, Shape | None, Shape]
"""(section, group, index, op, in_shape, skip_shape, out_shape), as given by `Transition.key()`."""

_TOKEN = re.compile(
    r"(?P<section>Down|Mid|Up|Head)\s*-\s*\{"
    r"|(?P<shape>\d+(?:\s*,\s*\d+){3})"
    r"|(?:->\s*)?\(\s*(?P<op>\w+)\s*\)\s*->"
    r"|(?P<arrow>->)|(?P<plus>\+)|(?P<open>\[)|(?P<close>\])|(?P<end>\})|(?P<space>\s+)"
)


def strip_whitespace(text: str) -> str:
    """The notation with every whitespace character removed (whitespace carries no meaning)."""
    return re.sub(r"\s+", "", text)


def _tokens(text: str):
    text = text.strip()
    if text.startswith("h:"):
        text = text[2:]
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            snippet = text[position : position + 30].replace("\n", " ")
            raise TraceNotationError(f"trace text: unexpected {snippet!r} at character {position}; "
                                     "expected a C,D,H,W shape, '->(op)->', '+', '[', ']' or a section such as 'Down-{'.")
        position = match.end()
        kind = match.lastgroup
        if kind != "space":
            yield kind, match.group(kind), match.start()


def parse_trace(text: str) -> list[TraceKey]:
    """Parse a trace in the seed's notation into transition keys, in order.

    Groups are numbered as in [`Step`][cpcbm_blocks.layout.Step]: down levels 1.. in order (0 for
    `conv_in`), middle segments 1.., up levels by the level they mirror (deepest first), head 0.
    """
    sections = {s.value.capitalize(): s for s in Section}
    keys: list[TraceKey] = []
    section: Section | None = None
    group = index = 0
    down_levels = up_brackets = 0
    main: Shape | None = None
    skip: Shape | None = None
    op: str | None = None
    after_plus = False
    for kind, value, at in _tokens(text):
        if kind == "section":
            section, group, index, op = sections[value.split("-")[0].strip()], 0, 0, None
        elif section is None:
            raise TraceNotationError(f"trace text: expected a section such as 'Down-{{' before character {at}.")
        elif kind == "open":
            index = 0
            if section is Section.UP:
                up_brackets += 1
                group = down_levels - up_brackets + 1
            else:
                group += 1
                down_levels = group if section is Section.DOWN else down_levels
        elif kind == "op":
            if main is None:
                raise TraceNotationError(f"trace text: operation ({value}) at character {at} has no input shape before it.")
            op = value
        elif kind == "plus":
            after_plus = True
        elif kind == "shape":
            shape: Shape = tuple(int(v) for v in value.split(","))  # type: ignore[assignment]
            if after_plus:
                skip, after_plus = shape, False
            elif op is not None:
                index += 1
                keys.append((section.value, group, index, op, main, skip, shape))
                main, skip, op = shape, None, None
            elif main is not None and (main != shape or skip is not None):
                raise TraceNotationError(f"trace text: shape {value} at character {at} restates the chain's current "
                                         f"shape but differs from it ({','.join(map(str, main))}).")
            else:
                main = shape
    if op is not None or after_plus:
        raise TraceNotationError("trace text: ends in the middle of a transition.")
    return keys


def _shape(shape: Shape) -> str:
    return ",".join(str(v) for v in shape)


def render_trace(plan: Plan, *, include_head: bool = True) -> str:
    """Render a plan in the seed's notation (the same layout as `CPC_BM_model.md`).

    With `include_head=False` the text covers exactly what the seed shows.
    """
    by_section: dict[Section, list[Transition]] = {s: [] for s in Section}
    for transition in plan.transitions:
        by_section[transition.step.section].append(transition)

    def chain(transitions: list[Transition], newline_before_skip: bool, opens_bracket: bool = False) -> str:
        text = ""
        for position, t in enumerate(transitions):
            if t.skip_shape is not None:
                text += ("\n" if newline_before_skip else " ") + f"{_shape(t.in_shape)} + {_shape(t.skip_shape)} "
            arrow = "" if opens_bracket and position == 0 else "->"
            text += f"{arrow}({t.step.op.value})-> "
            text += "" if _next_takes_skip(transitions, t) else _shape(t.out_shape) + " "
        return text.rstrip()

    def _groups(transitions: list[Transition]) -> list[list[Transition]]:
        groups: dict[int, list[Transition]] = {}
        for t in transitions:
            groups.setdefault(t.step.group, []).append(t)
        return list(groups.values())

    down = by_section[Section.DOWN]
    stem = [t for t in down if t.step.group == 0]
    text = "h: \nDown-{" + _shape(stem[0].in_shape) + " " + chain(stem, False)
    for level in _groups([t for t in down if t.step.group > 0]):
        text += " ->[" + chain(level, False, opens_bracket=True) + "]"
    text += "}\nMid-{"
    text += " -> ".join("[" + _shape(seg[0].in_shape) + " " + chain(seg, False) + "]"
                        for seg in _groups(by_section[Section.MID]))
    up = by_section[Section.UP]
    text += "}\nUp-{" + _shape(up[0].in_shape)
    for level in _groups(up):
        text += " ->[" + chain(level, True, opens_bracket=True) + "]"
    text += "}"
    if include_head and by_section[Section.HEAD]:
        head = by_section[Section.HEAD]
        text += "\nHead-{" + _shape(head[0].in_shape) + " " + chain(head, False) + "}"
    return text


def _next_takes_skip(transitions: list[Transition], t: Transition) -> bool:
    position = transitions.index(t)
    return position + 1 < len(transitions) and transitions[position + 1].skip_shape is not None
