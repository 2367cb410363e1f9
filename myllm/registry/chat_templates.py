"""Chat templates as programs: the Jinja sandbox they run in, bounded in time and output.

A template comes from a GGUF file or a Modelfile, so it is checked before it is registered
(`check_template`), and every rendering runs under a `Deadline` (runtime/request/template.py renders
prompts with it). It lives with the registry because registering a model is where a template
that explodes is refused.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment

from myllm.errors import InvalidOptions
from myllm.registry import template_limits as limits


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


class TemplateRejected(InvalidOptions):
    """The template raised for these messages (`raise_exception`, an error of its own such as a
    TypeError): it does not support the conversation, as opposed to running out of time or room."""


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


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with `~` joined by `environment.join_parts` (which sizes the
    parts first) instead of Jinja's own join functions."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        markup = "context.eval_ctx.volatile" if frame.eval_ctx.volatile else str(bool(frame.eval_ctx.autoescape))
        self.write(f"environment.join_parts({markup}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, plus a deadline check at every call, filter, attribute and
    item lookup, lists it hands out watched, and every value it builds sized before it is built
    and counted after (registry/template_limits.py): operators, `~`, methods, filters (wrapped
    in `compile_template`), printed values and captured output (`concat`)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's signature)
        _check()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, bytes)) and getattr(__obj, "__name__", "") == "join" and len(args) == 1:
            items = list(args[0])  # once: a generator given to join is read here, and join gets the list
            limits.check(limits.estimate_items_join(owner, items), "joins a string")
            args = (items,)
        else:
            size = limits.estimate_method(__obj, args, kwargs)
            if size is not None:
                limits.check(size, f"calls {getattr(__obj, '__name__', 'a method')}() to build a value")
        return _watch(limits.claim(super().call(__context, __obj, *args, **kwargs)))

    def call_filter(self, *args: Any, **kwargs: Any) -> Any:
        _check()
        return _watch(super().call_filter(*args, **kwargs))

    def getitem(self, obj: Any, argument: Any) -> Any:
        _check()
        item = super().getitem(obj, argument)
        return _watch(limits.claim(item) if isinstance(argument, slice) else item)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _check()
        return super().getattr(obj, attribute)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check()
        limits.estimate_binop(operator, left, right)
        return limits.claim(super().call_binop(context, operator, left, right))

    @staticmethod
    def join_parts(markup: bool, parts: tuple[Any, ...]) -> str:
        """`a ~ b ~ c`, sized before it is joined."""
        limits.estimate_join(parts)
        return limits.claim(markup_join(parts) if markup else str_join(parts))

    @staticmethod
    def concat(parts: Iterable[str]) -> str:  # type: ignore[override]
        """Captured output (a `set` block, a macro's body, a filter block), sized before it is joined."""
        pieces = list(parts)
        limits.estimate_join(pieces)
        return limits.claim("".join(pieces))


def _finalize(value: Any) -> Any:
    """Every printed value: a string is printed as it is, anything else becomes its text, sized first."""
    if not isinstance(value, (str, int, float, type(None))):
        limits.count(limits.text_size(value))
    return value


def _raise(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=32)
def compile_template(template: str) -> Any:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, finalize=_finalize)
    del env.globals["lipsum"]  # generates as many paragraphs as asked
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    for name in limits.REMOVED:
        del env.filters[name]
    env.filters.update({name: limits.bounded_filter(name, fn) for name, fn in env.filters.items()})
    return env.from_string(template)


def render(template: Any, messages: list[dict[str, Any]], deadline: Deadline | None, **context: Any) -> str:
    """Render chunk by chunk (each chunk is a deadline check and counts toward the output bound)."""
    _current.deadline = deadline
    limits.begin(limits.Budget())
    try:
        out: list[str] = []
        size = 0
        for chunk in template.generate(messages=_Watched(messages), **context):
            size += len(chunk)
            if size > limits.MAX_OUTPUT:
                raise InvalidOptions("the model's chat template produced a prompt larger than its limit", field="messages")
            _check()
            out.append(chunk)
        return "".join(out)
    except TemplateError as exc:
        # Templates raise for conversations they do not support (e.g. roles out of order).
        raise TemplateRejected(f"the model's chat template rejected the messages: {exc}", field="messages") from exc
    except (InvalidOptions, RenderCancelled):
        raise
    except MemoryError as exc:
        raise InvalidOptions("the model's chat template ran out of memory on the messages", field="messages") from exc
    except Exception as exc:  # noqa: BLE001 (a template is a program: any error of its own is the request's 400)
        # OverflowError (`range(10**20)`), TypeError, ZeroDivisionError, RecursionError...
        raise TemplateRejected(f"the model's chat template failed on the messages ({type(exc).__name__}: "
                               f"{str(exc)[:200]})", field="messages") from exc
    finally:
        _current.deadline = None
        limits.begin(None)


CHECK_SECONDS = 2.0
"""How long a template being registered may take to render each of `CHECKED`."""

_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
_TURNS = [{"role": "user", "content": "What is the capital of France?"},
          {"role": "assistant", "content": "Paris."}]
CHECKED: tuple[tuple[str, list[dict[str, Any]], dict[str, Any]], ...] = (
    ("a one-message conversation", [{"role": "user", "content": "Hello"}], {}),
    ("a conversation of several turns", [{"role": "system", "content": "Be brief."}, *_TURNS * 2,
                                         {"role": "user", "content": "And of Italy?"}], {}),
    ("a conversation with tools", [
        {"role": "system", "content": "Use the tools."}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "18 C, sunny"}], {"tools": [_TOOL]}),
    ("a long conversation", [{"role": "system", "content": "Be brief."}, *_TURNS * 64,
                             {"role": "user", "content": "Thanks."}], {}),
)
"""What a template must render at registration: a template that explodes only with more than
one message, a system message, tools or many turns is refused there too. The first must render;
the others may be refused by the template itself (`TemplateRejected`: many templates take no
system or tool role), never by a bound."""


def check_template(template: str, cancelled: threading.Event | None = None) -> None:
    """Refuse a chat template at registration rather than at a user's first chat: it must
    compile (`TemplateSyntaxError`) and render each of `CHECKED` within `CHECK_SECONDS` and the
    bounds on what it builds and outputs (`InvalidOptions`). `cancelled` stops it (a client gone)."""
    compiled = compile_template(template)
    for i, (what, messages, extra) in enumerate(CHECKED):
        try:
            render(compiled, messages, Deadline(CHECK_SECONDS, cancelled), bos_token="", eos_token="",
                   add_generation_prompt=True, **extra)
        except TemplateRejected as exc:
            if i == 0:
                raise InvalidOptions(f"the chat template fails on {what}: {exc.message}", field="template") from None
        except InvalidOptions as exc:
            raise InvalidOptions(f"the chat template fails on {what}: {exc.message}", field="template") from None
