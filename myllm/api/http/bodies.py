"""Every JSON request body is checked once, where it enters, before any route reads it: each
string in it (keys too) is text, and arrays and objects nest at most `MYLLM_MAX_JSON_DEPTH`
deep.

JSON can carry a lone surrogate as an escape (`"\\ud800"`), which Python decodes into a str that
is no text: it used to pass the request models and fail later, wherever the string was encoded
(sent to a runner, stored, written into the answer), as a 500 that also dropped the connection:
`stop`, `/llama`'s `pre_response`, an Anthropic prefill, Responses `metadata`. A NUL ends C
strings in llama.cpp and is refused by PostgreSQL. And a value nested ~1000 deep passes the
parser but reaches Python's recursion limit in whatever walks it next (a template's `tojson`).
Checking the parsed body here covers every field of every route, present and future, and names
the field in the route's own error shape."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from myllm.api.state import services
from myllm.errors import InvalidOptions

MAX_SHOWN_PATH = 200


def _problem(text: str) -> str | None:
    if "\x00" in text:
        return "a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone surrogate ({text[exc.start]!r}), which is not text"
    return None


Where = tuple["Where", str | int] | None
"""A value's place in the body as a link to its parent's place and its key or index: made in
constant time per value, spelled out (`messages[0].content`) only for an error. Building each
path's text up front cost a copy of every long key per array item: a 24 KB body took 40 MB."""


def _spelled(where: Where) -> str:
    steps: list[str | int] = []
    while where is not None:
        where, step = where
        steps.append(step)
    text = ""
    for step in reversed(steps):
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
        if len(text) > MAX_SHOWN_PATH:
            return text[:MAX_SHOWN_PATH] + "…"
    return text


def _refuse(message: str, where: Where) -> InvalidOptions:
    path = _spelled(where)
    return InvalidOptions(message.format(path or "the body"), field=path or None)


def check_json_body(value: Any, max_depth: int) -> None:
    """`InvalidOptions` naming the first field (`messages[0].content`, `options.stop[1]`) whose
    string is not text, or where the nesting goes deeper than `max_depth`. Walked without
    recursion: the depth is what is being checked."""
    stack: list[tuple[Any, Where, int]] = [(value, None, 0)]
    while stack:
        item, where, depth = stack.pop()
        if isinstance(item, str):
            if (problem := _problem(item)) is not None:
                raise _refuse(f"{{}} contains {problem}", where)
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth >= max_depth:
            raise _refuse(f"{{}} nests arrays and objects deeper than {max_depth} levels (MYLLM_MAX_JSON_DEPTH)", where)
        if isinstance(item, dict):
            for key, child in item.items():
                if (problem := _problem(key)) is not None:
                    raise _refuse(f"a key in {{}} contains {problem}", where)
                stack.append((child, (where, key), depth + 1))
        else:
            stack.extend((child, (where, i), depth + 1) for i, child in enumerate(item))


async def checked_json_body(request: Request) -> None:
    """The app-wide dependency: runs after FastAPI has parsed a route's JSON body (so the parsed
    value is at hand, read once) and before the route's model validates it. Routes without a
    body model (uploads streamed to disk) are never read here."""
    if getattr(request.scope.get("route"), "body_field", None) is None:
        return
    if "json" not in request.headers.get("content-type", "json"):
        return
    try:
        value = await request.json()
    except ValueError:  # empty or malformed: the route's own parsing has said so
        return
    check_json_body(value, services(request).settings.max_json_depth)
