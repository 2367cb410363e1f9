"""What a chat template may build, checked before it is built.

A template runs in the daemon's process, so a value it builds is the daemon's memory: one
`'%0400000000d' % 0`, `'x'.ljust(10**9)` or `'x'|indent(10**9)` asks for gigabytes in one call,
and a loop that doubles a string with `~` gets there in thirty steps, all before the rendering's
output is counted. So every operation that can build a string or a list (an operator, a `~`, a
method or filter that can make its result larger than what it was given, a printed value, a
captured block) has its result's size estimated from its arguments first (`estimate_*`), and
is refused when that passes `MAX_VALUE`; and each result is counted (`claim`) against the
rendering's `Budget` (`MAX_BUILT` in all), so a loop that keeps many values alive is stopped too.
Sizes are in characters (a list item counts as `ITEM` characters: a pointer).

Refusals are `InvalidOptions`: at a chat, a 400 naming the template; at registration,
`check_template` refuses the template.
"""

from __future__ import annotations

import inspect
import re
import string
import threading
from collections.abc import Callable, Collection, Mapping
from typing import Any

from jinja2.utils import Namespace

from myllm.errors import InvalidOptions

MAX_OUTPUT = 16 << 20
"""Characters a rendering may produce (a 4 MB request body renders to a little more)."""
MAX_VALUE = MAX_OUTPUT
"""The largest string (in characters) or list (in `ITEM`s per item) any one operation may build."""
MAX_BUILT = 4 * MAX_OUTPUT
"""What one rendering's operations may build in all (a plain template builds about its output
once or twice: each `+` of a turn's pieces copies them)."""
MAX_INT_BITS = 1 << 16
"""The largest integer a template may compute (`*`, `**`): big integers are memory too."""
ITEM = 8
"""What one item of a list, tuple or dict counts, in characters."""
FLOAT_TEXT = 330
"""The longest text of a float in `%f` or `{:f}` (1e308 has 309 digits)."""

_state = threading.local()


class Budget:
    """What one rendering has built so far (`claim` counts against it)."""

    def __init__(self) -> None:
        self.built = 0


def begin(budget: Budget | None) -> None:
    """Count this thread's claims against `budget` (None: check sizes only) until the next call."""
    _state.budget = budget


def _refuse(what: str) -> InvalidOptions:
    return InvalidOptions(f"the model's chat template {what}", field="messages")


def check(size: int, what: str = "builds a value") -> None:
    """Refuse a value of `size` before it is built."""
    if size > MAX_VALUE:
        raise _refuse(f"{what} larger than its limit ({MAX_VALUE} characters)")


def claim(value: Any) -> Any:
    """Count a value just built against the rendering's budget (a string's characters, a
    container's items); returns it."""
    if isinstance(value, (str, bytes, bytearray)):
        size = len(value)
    elif isinstance(value, (list, tuple, dict, set, frozenset)):
        size = ITEM * len(value)
    else:
        return value
    count(size)
    return value


def count(size: int) -> None:
    """Count `size` characters built (or about to be) against the rendering's budget."""
    check(size)
    budget: Budget | None = getattr(_state, "budget", None)
    if budget is not None:
        budget.built += size
        if budget.built > MAX_BUILT:
            raise _refuse(f"builds more than its limit in all ({MAX_BUILT} characters in one rendering)")


# -- sizes ----------------------------------------------------------------------------------


def text_size(value: Any) -> int:
    """An upper bound of `len(str(value))`, found without building it (a container's text is
    its repr); the walk stops once past `MAX_VALUE`."""
    if isinstance(value, str):
        return len(value)
    return shape(value)[0]


def shape(value: Any) -> tuple[int, int, int]:
    """(an upper bound of `len(repr(value))`, its items, its depth), walking containers no
    further than `MAX_VALUE` characters. Shared sublists count each time they appear, as their
    text does."""
    chars = items = depth = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack and chars <= MAX_VALUE:
        item, level = stack.pop()
        depth = max(depth, level)
        if isinstance(item, str):
            chars += len(item) + 2 + (0 if item.isprintable() else 9 * len(item)) + item.count("\\") + item.count("'")
        elif isinstance(item, (bytes, bytearray)):
            chars += 4 * len(item) + 3
        elif item is None or isinstance(item, (bool, float)):
            chars += 32
        elif isinstance(item, int):
            chars += item.bit_length() // 3 + 2
        elif isinstance(item, Namespace):
            chars += 16
            stack.append((dict(item.__dict__.get("_Namespace__attrs", {})), level + 1))
        elif isinstance(item, range):
            chars += 40
        elif isinstance(item, Mapping):
            chars += 2 + 4 * len(item)
            items += len(item)
            stack.extend((part, level + 1) for pair in list(item.items())[: MAX_VALUE - chars] for part in pair)
        elif isinstance(item, Collection):
            chars += 2 + 2 * len(item)
            items += len(item)
            stack.extend((part, level + 1) for part in list(item)[: MAX_VALUE - chars])
        else:
            chars += 200  # objects of the runtime (a loop, a macro, Undefined): short reprs
    return chars, items, depth


def _int(value: Any) -> int:
    """An argument used as a count or width (anything else: 0, and the call itself fails)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _width(text: str) -> int:
    """A width or precision written in a format spec (too many digits to be sensible: refused)."""
    if len(text) > 9:
        raise _refuse("formats with a width larger than its limit (9 digits)")
    return int(text)


_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?([diouxXeEfFgGcrsa%])")


def estimate_printf(fmt: str, args: Any, escape: bool = False) -> int:
    """`fmt % args`: the format, every argument's text, each conversion's width and precision
    (taken from the arguments for `*`), a float's digits. `escape`: Markup escapes arguments."""
    size = len(fmt) + (6 if escape else 1) * text_size(args)
    starred = sum(abs(_int(a)) for a in (args if isinstance(args, tuple) else (args,)))
    for match in _PRINTF.finditer(fmt):
        for number in match.group(1, 2):
            size += starred if number == "*" else _width(number) if number else 0
        if match.group(3) in "eEfFgG%":
            size += FLOAT_TEXT
    return size


def estimate_format(fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """`fmt.format(*args, **kwargs)`: like `estimate_printf`; a spec with a nested field takes
    its width from any argument."""
    values = (*args, *kwargs.values())
    size = len(fmt) + text_size(values)
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:  # the call fails the same way
        return size
    for _literal, _name, spec, _conversion in fields:
        if spec:
            if "{" in spec:
                size += sum(abs(_int(v)) for v in values)
            size += sum(_width(n) for n in re.findall(r"\d+", spec)) + FLOAT_TEXT
    return size


def estimate_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse `left operator right` when it would build too much (a string, a list, an integer)."""
    if operator == "*":
        if isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise _refuse(f"multiplies integers past its limit ({MAX_INT_BITS} bits)")
            return
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, bytes, list, tuple)) and isinstance(times, int):
                check((1 if isinstance(seq, (str, bytes)) else ITEM) * len(seq) * max(times, 0), "repeats a value")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and max(left.bit_length(), 1) * right > MAX_INT_BITS:
            raise _refuse(f"raises a number past its limit ({MAX_INT_BITS} bits)")
    elif operator == "+":
        if isinstance(left, (str, bytes)) and isinstance(right, (str, bytes)):
            check(len(left) + len(right), "concatenates a string")
        elif isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            check(ITEM * (len(left) + len(right)), "concatenates a list")
    elif operator == "%" and isinstance(left, str):
        check(estimate_printf(left, right, escape=hasattr(left, "__html__")), "formats a string")


def estimate_join(parts: tuple[Any, ...] | list[Any]) -> None:
    """`~` and captured output (a block, a macro's body): the parts' text together."""
    check(sum(text_size(part) for part in parts), "joins a string")


# -- methods and filters that can build more than they were given -----------------------------

Estimate = Callable[[dict[str, Any]], int]
"""The size a call would build, from its bound arguments (by parameter name)."""


def _str_replace(s: str, old: Any, new: Any, count: Any) -> int:
    s, old, new = str(s), str(old), str(new)
    n = s.count(old) if old else len(s) + 1
    if _int(count) >= 0 and isinstance(count, int):
        n = min(n, count)
    return len(s) + n * len(new)


def _translate(s: str, table: Any) -> int:
    values = table.values() if isinstance(table, Mapping) else table if isinstance(table, Collection) else ()
    longest = max((len(v) for v in values if isinstance(v, str)), default=1)
    return len(s) * max(longest, 1)


def _split(s: str, sep: Any, maxsplit: Any) -> int:
    if isinstance(sep, str) and sep:
        pieces = s.count(sep) + 1
    else:
        pieces = sum(s.count(c) for c in " \t\n\r\x0b\x0c") + 1
    if _int(maxsplit) >= 0 and isinstance(maxsplit, int):
        pieces = min(pieces, maxsplit + 1)
    return len(s) + ITEM * pieces


STR_METHODS: dict[str, Callable[..., int]] = {
    "center": lambda s, width=0, *_: max(len(s), _int(width)),
    "ljust": lambda s, width=0, *_: max(len(s), _int(width)),
    "rjust": lambda s, width=0, *_: max(len(s), _int(width)),
    "zfill": lambda s, width=0: max(len(s), _int(width)),
    "expandtabs": lambda s, tabsize=8: len(s) + s.count("\t" if isinstance(s, str) else b"\t") * max(_int(tabsize), 1),
    "replace": lambda s, old="", new="", count=-1: _str_replace(s, old, new, count) if isinstance(s, str) else len(s) * (len(new) + 1) + len(new),
    "translate": _translate,
    "split": lambda s, sep=None, maxsplit=-1: _split(s, sep, maxsplit) if isinstance(s, str) else len(s) * (ITEM + 1),
    "rsplit": lambda s, sep=None, maxsplit=-1: _split(s, sep, maxsplit) if isinstance(s, str) else len(s) * (ITEM + 1),
    "splitlines": lambda s, *_: len(s) + ITEM * (s.count("\n") + s.count("\r") + 1) if isinstance(s, str) else len(s) * (ITEM + 1),
    "upper": lambda s: 3 * len(s),
    "lower": lambda s: 3 * len(s),
    "title": lambda s: 3 * len(s),
    "capitalize": lambda s: 3 * len(s),
    "swapcase": lambda s: 3 * len(s),
    "casefold": lambda s: 3 * len(s),
    "encode": lambda s, *_: 10 * len(s),
    "hex": lambda s, *_: 3 * len(s),
}
"""A `str` (or `bytes`) method's result size from the string and its arguments (positional
only: Jinja passes what the template wrote). Methods not here build at most what they were given."""


def estimate_method(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The size a method call would build, when it can build more than it was given; None for
    other calls (their result is still counted). `str.format` reaches here as Jinja's sandboxed
    wrapper of it."""
    target = getattr(method, "__wrapped__", method)
    owner, name = getattr(target, "__self__", None), getattr(target, "__name__", "")
    if isinstance(owner, str) and name in ("format", "format_map"):
        mapping = args[0] if name == "format_map" and args and isinstance(args[0], Mapping) else {}
        return (6 if hasattr(owner, "__html__") else 1) * estimate_format(owner, args, {**mapping, **kwargs})
    if isinstance(owner, (str, bytes)) and name == "join":
        return None  # checked by the caller, which materialises the items once
    if isinstance(owner, (str, bytes)) and name in STR_METHODS:
        try:
            return STR_METHODS[name](owner, *args, **kwargs)
        except TypeError:
            return None  # the call fails the same way
    if isinstance(owner, int) and name == "to_bytes":
        return _int(args[0] if args else kwargs.get("length", 1))
    return None


def estimate_items_join(separator: Any, items: list[Any]) -> int:
    """`separator.join(items)` or `items|join(separator)`: every item's text and a separator between each two."""
    return sum(text_size(item) for item in items) + text_size(separator) * max(len(items) - 1, 0)


def _tojson(a: dict[str, Any]) -> int:
    indent = a.get("indent")
    if indent is not None and not 0 <= _int(indent) <= 16:
        raise _refuse("indents JSON by more than its limit (16)")
    chars, items, depth = shape(a["value"])
    return 6 * chars + items * (1 + _int(indent) * depth)


FILTERS: dict[str, Estimate] = {
    "center": lambda a: text_size(a["value"]) + _int(a["width"]),
    "indent": lambda a: text_size(a["s"]) * (1 + (len(a["width"]) if isinstance(a["width"], str) else _int(a["width"]))),
    "wordwrap": lambda a: (text_size(a["s"]) + 1) * (2 + text_size(a["wrapstring"] or "\n")),
    "format": lambda a: estimate_printf(str(a["value"]), a["kwargs"] or a["args"]),
    "replace": lambda a: _str_replace(a["s"], a["old"], a["new"], -1 if a["count"] is None else a["count"]) if isinstance(a["s"], str) else text_size(a["s"]) * (text_size(a["new"]) + 1),
    "join": lambda a: estimate_items_join(a["d"], list(a["value"])),
    "batch": lambda a: ITEM * (len(a["value"]) + max(_int(a["linecount"]), 0)),
    "slice": lambda a: ITEM * (len(a["value"]) + 8 * max(_int(a["slices"]), 0)),
    "sum": lambda a: sum(ITEM * len(v) if isinstance(v, (list, tuple)) else 0 for v in a["iterable"]),
    "tojson": _tojson,
    "string": lambda a: text_size(a["value"]),
    "list": lambda a: ITEM * len(a["value"]) if isinstance(a["value"], Collection) else 0,
    "upper": lambda a: 3 * text_size(a["s"]),
    "lower": lambda a: 3 * text_size(a["s"]),
    "title": lambda a: 3 * text_size(a["s"]),
    "capitalize": lambda a: 3 * text_size(a["s"]),
    "escape": lambda a: 6 * text_size(a["value"]),
    "e": lambda a: 6 * text_size(a["value"]),
    "forceescape": lambda a: 6 * text_size(a["value"]),
    "urlencode": lambda a: 12 * text_size(a["value"]),
    "xmlattr": lambda a: 6 * text_size(a["d"]),
    "truncate": lambda a: text_size(a["s"]) + text_size(a["end"]),
}
"""Filters that can build more than they were given, by their size from their bound arguments.
The others build at most what they were given (their result is still counted)."""

MATERIALISED = frozenset({"join", "batch", "slice", "sum", "list"})
"""Filters whose estimate reads their items: a one-shot iterator is made a list first, and that
list is what the filter gets."""
REMOVED = ("pprint", "urlize")
"""Filters a chat template has no use for whose output has no simple bound (nesting, attributes)."""


_PASSED = ("eval_ctx", "environment", "context", "env")
"""Names Jinja's filters give the context they are passed first."""


def _bind(signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any],
          value_at: int) -> dict[str, Any] | None:
    """A filter's arguments by parameter name, defaults included; None when the call does not
    fit the signature (the filter fails the same way)."""
    if len(args) <= value_at:
        return None
    if signature is None:
        return {"value": args[value_at]}
    first = next(iter(signature.parameters), "")
    skip = value_at if first not in _PASSED else 0  # a wrapper that passes the context to a function without it
    try:
        bound = signature.bind(*args[skip:], **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return {"value": args[value_at], **bound.arguments}


def bounded_filter(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` (a filter) checked before it runs (`FILTERS`) and its result counted. It keeps
    `fn`'s attributes (how Jinja passes a context to it) and runs at compile time too (Jinja
    folds constant expressions), where only sizes are checked."""
    try:
        signature: inspect.Signature | None = inspect.signature(fn)
    except (TypeError, ValueError):  # a C function (markupsafe's escape): one argument, the value
        signature = None
    estimate = FILTERS.get(name)
    value_at = 1 if getattr(fn, "jinja_pass_arg", None) is not None else 0

    def run(*args: Any, **kwargs: Any) -> Any:
        if name in MATERIALISED and len(args) > value_at and not isinstance(args[value_at], Collection):
            args = (*args[:value_at], list(args[value_at]), *args[value_at + 1 :])
        if estimate is not None:
            arguments = _bind(signature, args, kwargs, value_at)
            if arguments is not None:
                check(estimate(arguments), f"filter '{name}' builds a value")
        return claim(fn(*args, **kwargs))

    run.__dict__.update(getattr(fn, "__dict__", {}))
    run.__name__ = getattr(fn, "__name__", name)
    return run
