"""Tool calls: the tools a request offers, how they reach the prompt, the grammar that makes a
call certain when one is required, and reading calls out of generated text.

Models write calls in a few formats (`parse_calls` reads each); a model whose chat template does
not render tools is told about them in its system turn and asked for the Hermes format. When a
call is required (`tool_choice` `required` or a named function), generation is constrained by a
grammar built from the tools' schemas, so the output is a call to an offered function whose
arguments validate, whatever the model would rather have said; the grammar bounds how many calls
(a small model otherwise repeats calls until the token limit), and a reply the limit cut off still
yields the calls it completed.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

import jiter

from myllm.errors import InvalidOptions
from myllm.runtime.request.grammar import format_schema

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MISTRAL = "[TOOL_CALLS]"
HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
JSON_MARKERS = (MISTRAL, "<|python_tag|>")
"""Markers that JSON calls follow (Mistral's array, Llama 3.1's object)."""
MARKERS = (HERMES_OPEN, *JSON_MARKERS)
"""Text that starts a call in one of the formats `parse_calls` reads."""

Choice = Literal["auto", "none", "required"] | str
"""`auto`, `none`, `required`, or the name of the one function to call."""
CALL_KEYS = frozenset({"name", "arguments", "parameters", "function", "type", "id"})
"""The keys a call object may have in the formats models write (and OpenAI's own shape, echoed
back): an object with any other key is an answer, not a call."""
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def as_openai(self) -> dict[str, Any]:
        """The shape Hugging Face chat templates read (`tools`)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))


def json_depth(value: Any) -> int:
    """How deep arrays and objects nest in a parsed JSON value (a scalar is 0), walked without
    recursion, so no depth reaches Python's recursion limit here."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_tools(tools: list[Any]) -> list[Tool]:
    """OpenAI's function tools, checked: a 400 naming the tool for anything else."""
    parsed: list[Tool] = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise InvalidOptions(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", field="tools")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise InvalidOptions(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'", field="tools")
        if any(t.name == name for t in parsed):
            raise InvalidOptions(f"tools[{i}]: a second function named {name!r}", field="tools")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict) or params.get("type", "object") != "object":
            raise InvalidOptions(f"tools[{i}].function.parameters must be a JSON Schema of an object", field="tools")
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise InvalidOptions(f"tools[{i}].function.description must be a string", field="tools")
        parsed.append(Tool(name, description, params))
    return parsed


def check_choice(choice: Choice, tools: list[Tool]) -> None:
    if choice in ("auto", "none", "required"):
        if choice == "required" and not tools:
            raise InvalidOptions("tool_choice 'required' needs tools", field="tool_choice")
        return
    if not any(t.name == choice for t in tools):
        raise InvalidOptions(f"tool_choice names {choice!r}, which is not one of the tools offered", field="tool_choice")


def renders_tools(template: str | None) -> bool:
    """Whether a chat template renders the `tools` variable itself (Hugging Face's convention)."""
    return bool(template) and re.search(r"\btools\b", template or "") is not None


def describe(tools: list[Tool]) -> str:
    """What a model whose template knows no tools is told in its system turn."""
    listing = "\n".join(json.dumps(t.as_openai()["function"], ensure_ascii=False) for t in tools)
    return (
        "You can call these functions:\n" + listing + "\n\nTo call one, answer with only "
        '<tool_call>{"name": "<function name>", "arguments": {<arguments>}}</tool_call>; '
        "otherwise answer normally."
    )


def call_text(name: str, arguments: Any) -> str:
    """An earlier call as the fallback format writes it (so the model sees what it called)."""
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + "</tool_call>"


def embed(schema: Any, key: str, defs: dict[str, Any]) -> dict[str, Any]:
    """A reference to `schema` once it is part of a larger schema: it is placed in that
    schema's root `$defs` under `key`, its own local references (`#/$defs/X`, `#`) rebased onto
    where it now sits, since `#` means the root of the whole document. Without this, a tool's
    parameters or a requested format that uses `$defs` (pydantic's nested models, enums,
    lists of models) fail to resolve once combined."""
    base = f"#/$defs/{key}"
    root: dict[str, Any] = {}
    stack: list[tuple[Any, dict[str, Any] | list[Any], str | int]] = [(schema, root, "value")]
    while stack:  # a copy walked without recursion (no depth reaches Python's limit here)
        item, parent, slot = stack.pop()
        if isinstance(item, dict):
            copy: dict[str, Any] | list[Any] = dict.fromkeys(item)  # in order: keys order a grammar's properties
            for k, v in item.items():
                if k == "$ref" and isinstance(v, str) and v.startswith("#"):
                    copy[k] = base + v[1:]
                else:
                    stack.append((v, copy, k))
        elif isinstance(item, list):
            copy = [None] * len(item)
            stack.extend((v, copy, i) for i, v in enumerate(item))
        else:
            copy = item
        parent[slot] = copy  # type: ignore[index]
    defs[key] = root["value"]
    return {"$ref": base}


def call_schema(tools: list[Tool], choice: Choice, parallel: bool, most: int) -> dict[str, Any]:
    """A JSON Schema only calls of the allowed functions satisfy, arguments included: one call
    of the named function, or of any offered one, an array of 1 to `most` of them with
    `parallel`. Each tool's parameters sit in the root `$defs` (`embed`)."""
    allowed = [t for t in tools if choice in ("auto", "required") or t.name == choice]
    defs: dict[str, Any] = {}
    one = [
        {"type": "object", "properties": {"name": {"const": t.name}, "arguments": embed(t.parameters, f"tool-{i}", defs)},
         "required": ["name", "arguments"], "additionalProperties": False}
        for i, t in enumerate(allowed)
    ]
    call = one[0] if len(one) == 1 else {"anyOf": one}
    several = parallel and choice in ("auto", "required") and most > 1
    schema = {"type": "array", "items": call, "minItems": 1, "maxItems": most} if several else dict(call)
    return {**schema, "$defs": defs}


def _call_object(obj: Any) -> dict[str, Any] | None:
    """The object holding a call's name and arguments, if `obj` has only a call's keys: `obj`
    itself, or its `function` in OpenAI's own shape, echoed back."""
    if not isinstance(obj, dict) or not obj.keys() <= CALL_KEYS:
        return None
    return obj["function"] if isinstance(obj.get("function"), dict) else obj


def _as_call(obj: Any, names: set[str]) -> Call | None:
    """One call in any of the shapes models write it, or None."""
    if (obj := _call_object(obj)) is None:
        return None
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if name not in names or not isinstance(args, dict):
        return None
    return Call(name, args)


def _may_become_call(obj: Any, names: set[str]) -> bool:
    """Whether `obj`, a value read from the start of a reply (its last string perhaps cut
    short), can still grow into a call `_as_call` reads."""
    if (obj := _call_object(obj)) is None:
        return False
    name = obj.get("name")
    args = obj.get("arguments", obj.get("parameters"))
    return ((name is None or isinstance(name, str) and any(n.startswith(name) for n in names))
            and (args is None or isinstance(args, (dict, str))))


def may_be_call(text: str, tools: list[Tool]) -> bool:
    """Whether `text`, the start of a reply that begins with `{` or `[`, can still be the start
    of JSON calls: it must read as the beginning of one JSON value (read leniently to its cut
    end by jiter) whose objects have only a call's keys, naming an offered function so far; and
    nothing may follow a value already complete."""
    stripped = text.strip()
    try:
        value = jiter.from_json(stripped.encode(), partial_mode="trailing-strings")
    except ValueError:
        return False
    try:
        _, end = _DECODER.raw_decode(stripped)
    except ValueError:
        end = len(stripped)
    names = {t.name for t in tools}
    items = value if isinstance(value, list) else [value]
    return end == len(stripped) and all(_may_become_call(item, names) for item in items)


def _leading_calls(payload: str, names: set[str]) -> tuple[str, list[Call]] | None:
    """The complete calls at the start of `payload`, a JSON call or array of calls (as
    `may_be_call` found it) the token limit cut off, and the text after them: the element the
    cut left unfinished, as it was written. None when no element was completed, or when one
    that was is not a call (then the whole reply is content, as a whole reply would be)."""
    is_array = payload.startswith("[")
    at, calls = int(is_array), []
    while True:
        at = len(payload) - len(payload[at:].lstrip())
        try:
            item, at = _DECODER.raw_decode(payload, at)
        except ValueError:
            break
        if (call := _as_call(item, names)) is None:
            return None
        calls.append(call)
        rest = payload[at:].lstrip()
        if not is_array or not rest.startswith(","):
            break
        at = len(payload) - len(rest) + 1
    return (payload[at:].strip(), calls) if calls else None


def _block_calls(payloads: list[str], names: set[str]) -> list[Call] | None:
    """The calls of Hermes blocks' payloads, in order; None unless every payload is calls."""
    groups = [_calls(payload, names) for payload in payloads]
    return None if any(group is None for group in groups) else [call for group in groups if group for call in group]


def _calls(payload: str, names: set[str]) -> list[Call] | None:
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_as_call(item, names) for item in items]
    return None if not calls or any(c is None for c in calls) else [c for c in calls if c is not None]


def _hermes_blocks(text: str) -> tuple[list[str], str]:
    """The payloads of the `<tool_call>...</tool_call>` blocks in `text` (the last one may be
    unclosed), stripped, and the text around them. By `str.find`, one pass: a regular expression
    with a lazy body between whitespace runs backtracks quadratically on long runs of spaces, and
    a client can make a model write those."""
    payloads: list[str] = []
    rest: list[str] = []
    at = 0
    while (start := text.find(HERMES_OPEN, at)) >= 0:
        rest.append(text[at:start])
        body = start + len(HERMES_OPEN)
        close = text.find(HERMES_CLOSE, body)
        payloads.append(text[body: len(text) if close < 0 else close].strip())
        at = len(text) if close < 0 else close + len(HERMES_CLOSE)
    rest.append(text[at:])
    return payloads, "".join(rest)


def parse_calls(text: str, tools: list[Tool]) -> tuple[str, list[Call]]:
    """(content, calls) of a reply. Recognised: Hermes/Qwen `<tool_call>{...}</tool_call>` (any
    number, text around them stays content), Mistral `[TOOL_CALLS] [...]`, Llama 3.1
    `<|python_tag|>` or bare `{"name", "parameters"}`, and plain JSON `{"name", "arguments"}` or
    a list of them. Whatever claims to be a call but does not parse or names a function not
    offered is returned as text."""
    names = {t.name for t in tools}
    stripped = text.strip()
    if HERMES_OPEN in stripped:
        payloads, around = _hermes_blocks(stripped)  # at least one: the text holds a marker
        found = _block_calls(payloads, names)
        return (around.strip(), found) if found is not None else (text, [])
    for marker in JSON_MARKERS:
        if stripped.startswith(marker):
            calls_found = _calls(stripped[len(marker):].strip(), names)
            return ("", calls_found) if calls_found else (text, [])
    if stripped.startswith(("{", "[")):
        calls_found = _calls(stripped, names)
        if calls_found:
            return "", calls_found
    return text, []


def parse_cut_calls(text: str, tools: list[Tool]) -> tuple[str, list[Call]] | None:
    """(content, calls) of a reply the token limit cut off in the middle of its calls: the
    calls it completed, and as content the text around them with the call cut short as it was
    written (its arguments are not whole, so it is no call, but it is not dropped either). None
    when the reply completed no call (then it is all content): it does not start like calls, the
    first call is the one cut, or something complete in it is not a call."""
    names = {t.name for t in tools}
    stripped = text.strip()
    if HERMES_OPEN in stripped:
        payloads, around = _hermes_blocks(stripped)
        last = stripped.rfind(HERMES_OPEN)
        cut = ""
        if stripped.find(HERMES_CLOSE, last) < 0:  # the last block is the one cut short
            payloads, cut = payloads[:-1], stripped[last:]
        found = _block_calls(payloads, names)
        return ((around + cut).strip(), found) if found else None
    for marker in JSON_MARKERS:
        if stripped.startswith(marker):
            stripped = stripped[len(marker):].strip()
            break
    if not stripped.startswith(("{", "[")) or not may_be_call(stripped, tools):
        return None
    return _leading_calls(stripped, names)


class CallFilter:
    """Streams a reply's text while holding back what may be a call: text that starts with a
    marker is held to the end and parsed then; text that starts with `{` or `[` only while it
    can still be JSON calls (`may_be_call`); after plain text, a Hermes `<tool_call>` is held
    from where it starts. A reply forced to be calls is all held: none of it is content."""

    def __init__(self, tools: list[Tool], forced: bool = False) -> None:
        self.tools = tools
        self.forced = forced
        self.held = ""
        self.plain = False
        """Text has been let through: only a later `<tool_call>` is held now."""

    def feed(self, text: str) -> str:
        self.held += text
        if self.forced:
            return ""
        if not self.plain:
            start = self.held.lstrip()
            if not start or any(m.startswith(start) or start.startswith(m) for m in MARKERS):
                return ""
            if start.startswith(("{", "[")) and may_be_call(start, self.tools):
                return ""
            self.plain = True
        cut = self.held.find(HERMES_OPEN)
        if cut < 0:  # keep back a tail that may be the start of the marker
            tails = range(max(0, len(self.held) - len(HERMES_OPEN) + 1), len(self.held))
            cut = next((i for i in tails if HERMES_OPEN.startswith(self.held[i:])), len(self.held))
        out, self.held = self.held[:cut], self.held[cut:]
        return out

    def finish(self, cut_off: bool = False) -> tuple[str, list[Call]]:
        """The rest of the content (what was held, less the calls in it), and the calls: what
        is not a call stays content, never dropped. When the token limit `cut_off` the reply,
        the calls it completed, the one it cut short as content. A forced reply's text is never
        content, even when no call in it was completed: the grammar wrote it, not the model's
        answer."""
        content, calls = parse_calls(self.held, self.tools)
        if cut_off and not calls:
            content, calls = parse_cut_calls(self.held, self.tools) or (content, calls)
        return ("", calls) if self.forced else (content, calls)


def _normal_calls(calls: list[Any]) -> list[dict[str, Any]]:
    """A message's tool calls as templates read them: OpenAI's shape, arguments an object
    (OpenAI clients send them as a JSON string)."""
    out = []
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else {}
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        entry: dict[str, Any] = {"type": "function", "function": {"name": fn.get("name", ""), "arguments": args}}
        if isinstance(call, dict) and call.get("id"):
            entry["id"] = call["id"]
        out.append(entry)
    return out


@dataclass(frozen=True)
class ToolUse:
    """What a request asks of tools: the offered functions, `tool_choice`, `parallel_tool_calls`."""

    tools: list[Tool]
    choice: Choice = "auto"
    parallel: bool = True
    most: int = 8
    """Calls one reply may make when `parallel` (MYLLM_MAX_TOOL_CALLS)."""

    @property
    def active(self) -> bool:
        """Whether the reply may hold calls (and is read for them)."""
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.active and self.choice != "auto"

    def format(self, requested: Literal["json"] | dict[str, Any] | None) -> Literal["json"] | dict[str, Any] | None:
        """The output format to enforce: a call when one is required; with `auto` and a
        requested format, a call or text that follows the format."""
        if not self.active:
            return requested
        calls = call_schema(self.tools, self.choice, self.parallel, self.most)
        if self.forced:
            return calls
        if requested is None:
            return None
        defs = calls.pop("$defs")
        answer = embed(format_schema(requested), "format", defs)
        return {"anyOf": [calls, answer], "$defs": defs}

    def prompt(self, messages: list[dict[str, Any]], template: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """(messages, the template's `tools`). A template that renders tools gets them and the
        calls as they are; for one that does not, the system turn describes the tools and
        earlier calls are written into their messages in the format it asks for."""
        if renders_tools(template):
            msgs = [{**m, "tool_calls": _normal_calls(m["tool_calls"])} if m.get("tool_calls") else m for m in messages]
            return msgs, [t.as_openai() for t in self.tools] if self.active else None
        msgs = []
        for m in messages:
            m = dict(m)
            if calls := m.pop("tool_calls", None):
                written = "".join(call_text(c["function"]["name"], c["function"]["arguments"]) for c in _normal_calls(calls))
                m["content"] = (m["content"] + "\n" if m["content"] else "") + written
            msgs.append(m)
        if self.active:
            if msgs and msgs[0]["role"] == "system":
                msgs[0] = {**msgs[0], "content": msgs[0]["content"] + "\n\n" + describe(self.tools)}
            else:
                msgs.insert(0, {"role": "system", "content": describe(self.tools)})
        return msgs, None
