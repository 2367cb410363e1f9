"""Chat templates as programs: the Jinja sandbox they run in, bounded in time and output.

A template comes from a GGUF file or a Modelfile, so it is checked before it is registered
(`check_template`), and every rendering runs under a `Deadline` (runtime/template.py renders
prompts with it). It lives with the registry because registering a model is where a template
that explodes is refused.
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from myllm.errors import InvalidOptions


class Deadline:
    """How long one rendering may run, and whether its caller still wants it. A template is a
    program (a GGUF or a Modelfile brings it): loops over hundreds of messages can run for
    minutes, and a thread cannot be stopped from outside, so the sandbox's hooks ask this
    between steps and the rendering raises instead of running on."""

    def __init__(self, seconds: float, cancelled: threading.Event | None = None) -> None:
        self.seconds = seconds
        self.ends = time.monotonic() + seconds
        self.cancelled = cancelled or threading.Event()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise RenderCancelled()
        if time.monotonic() > self.ends:
            raise InvalidOptions(
                f"the model's chat template took more than {self.seconds:g} s to render these messages",
                field="messages",
            )


class RenderCancelled(Exception):
    """The request that wanted this rendering is gone (client left, daemon stopping)."""


_current = threading.local()


def _check() -> None:
    deadline: Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.check()


class _Watched(list):  # type: ignore[type-arg]
    """A list whose every iteration asks the deadline first: nested loops over the messages
    are what makes a template slow, and plain iteration calls no sandbox hook."""

    def __iter__(self) -> Any:
        _check()
        return super().__iter__()


def _watch(value: Any) -> Any:
    return _Watched(value) if isinstance(value, (list, range)) and not isinstance(value, _Watched) else value


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, plus a deadline check at every call, filter, attribute and
    item lookup, lists it hands out watched, and no string or list multiplied past a bound."""

    intercepted_binops = frozenset({"*", "**"})

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's signature)
        _check()
        return _watch(super().call(__context, __obj, *args, **kwargs))

    def call_filter(self, *args: Any, **kwargs: Any) -> Any:
        _check()
        return _watch(super().call_filter(*args, **kwargs))

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check()
        return _watch(super().getitem(obj, argument))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check()
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check()
        if operator == "*" and isinstance(right, int) and isinstance(left, (str, list, tuple)) and len(left) * right > MAX_OUTPUT:
            raise InvalidOptions("the model's chat template builds a string larger than its limit", field="messages")
        if operator == "**" and isinstance(right, int) and right > 64:
            raise InvalidOptions("the model's chat template raises a number to a power larger than 64", field="messages")
        return super().call_binop(context, operator, left, right)


def _raise(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=32)
def compile_template(template: str) -> Any:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env.from_string(template)


MAX_OUTPUT = 16 << 20
"""Characters a rendering may produce (a 4 MB request body renders to a little more)."""


def render(template: Any, messages: list[dict[str, Any]], deadline: Deadline | None, **context: Any) -> str:
    """Render chunk by chunk (each chunk is a deadline check and counts toward the output bound)."""
    _current.deadline = deadline
    try:
        out: list[str] = []
        size = 0
        for chunk in template.generate(messages=_Watched(messages), **context):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise InvalidOptions("the model's chat template produced a prompt larger than its limit", field="messages")
            _check()
            out.append(chunk)
        return "".join(out)
    except TemplateError as exc:
        # Templates raise for conversations they do not support (e.g. roles out of order).
        raise InvalidOptions(f"the model's chat template rejected the messages: {exc}", field="messages") from exc
    except (InvalidOptions, RenderCancelled):
        raise
    except Exception as exc:  # noqa: BLE001 (a template is a program: any error of its own is the request's 400)
        # OverflowError (`range(10**20)`), TypeError, ZeroDivisionError, RecursionError, MemoryError...
        raise InvalidOptions(f"the model's chat template failed on the messages ({type(exc).__name__}: "
                             f"{str(exc)[:200]})", field="messages") from exc
    finally:
        _current.deadline = None


CHECK_SECONDS = 2.0
"""How long a template being registered may take to render a one-message conversation."""


def check_template(template: str) -> None:
    """Refuse a chat template at registration rather than at a user's first chat: it must
    compile (`TemplateSyntaxError`) and render a plain one-message conversation within
    `CHECK_SECONDS` and the output bound (`InvalidOptions`)."""
    try:
        render(compile_template(template), [{"role": "user", "content": "Hello"}], Deadline(CHECK_SECONDS),
               bos_token="", eos_token="", add_generation_prompt=True)
    except InvalidOptions as exc:
        raise InvalidOptions(f"the chat template fails on a one-message conversation: {exc.message}", field="template") from None
