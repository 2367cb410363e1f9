"""JSON Schemas measured before they become grammars.

llama-cpp-python's converter (`llama_grammar.json_schema_to_gbnf`) writes a repetition out in
full: `{"type": "string", "minLength": 250000000}` becomes a rule of 250 million `char`s (gigabytes,
tens of seconds) before anyone can compare the grammar with `max_grammar`; `minItems`, `maxLength`,
a pattern's `{m,n}` and a literal run under one do the same, and a pattern such as `^]$` sends it
into an endless loop. So a schema is measured first, without building anything: its size as JSON
values and its nesting, then the grammar the converter would write, computed by following the
converter's own walk (its names, its `$ref` resolution, its repetition layout) with numbers in
place of strings. The figure is a close estimate of the grammar's length, kept on the low side, so
a schema refused here would have been refused after conversion too; the exact length is checked
again after conversion (`runtime/request/grammar.py`). The walk stops as soon as a bound is passed, so
measuring costs at most as much as the bounds allow, whatever the schema.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from myllm.errors import InvalidOptions

_NON_LITERAL = set("|.()[]{}*+?")
_ESCAPED_IN_REGEX = set("[]()|{}*+?")
_INVALID_RULE_CHARS = re.compile(r"[^a-zA-Z0-9-]+")
"""The converter's own: what it turns into `-` in a rule name (linear: one class, no nesting)."""
_HUGE = 10**12
"""A quantifier with more digits than any count that could fit a grammar: read as this."""


@dataclass(frozen=True)
class SchemaLimits:
    """The settings that bound a schema (`MYLLM_MAX_GRAMMAR`, `MYLLM_MAX_SCHEMA_DEPTH`,
    `MYLLM_MAX_SCHEMA_NODES`)."""

    grammar: int
    depth: int
    nodes: int


class _TooLarge(Exception):
    """The running estimate passed the grammar bound: measuring stops."""


class _Unsupported(Exception):
    """What the converter would not return from (it would loop forever)."""


def check_schema(schema: Any, limits: SchemaLimits, field: str) -> None:
    """`InvalidOptions` naming `field` when the schema has more JSON values than `limits.nodes`,
    nests deeper than `limits.depth`, or would become a grammar longer than `limits.grammar`
    characters; silent otherwise (what the converter cannot express it reports itself)."""
    _check_shape(schema, limits, field)
    if not isinstance(schema, dict):
        return
    estimate = _Estimate(schema, limits, bound=limits.grammar + limits.grammar // 4)
    try:
        estimate.visit(schema, 0, 0)
    except _Unsupported as exc:
        raise InvalidOptions(f"unsupported {described(field)}: {exc}", field=field) from None
    except _TooLarge:
        where = f" (at {estimate.cause})" if estimate.cause else ""
        raise InvalidOptions(
            f"{described(field)} would become a grammar of more than {limits.grammar} characters{where}, "
            f"more than MYLLM_MAX_GRAMMAR allows; use smaller repetition counts (minLength, maxLength, minItems, "
            f"maxItems, {{m,n}} in patterns) or fewer enum values, properties or alternatives",
            field=field,
        ) from None


def described(field: str) -> str:
    """What a schema is called in errors: the output's, or the one a required tool call makes
    of the tools' parameters (the API's own name for the field goes with the error)."""
    return "the JSON schema of the tools' parameters" if field == "tools" else "the JSON schema"


def _check_shape(schema: Any, limits: SchemaLimits, field: str) -> None:
    """Values and nesting, counted without recursion and stopped at the first bound passed."""
    stack: list[tuple[Any, int]] = [(schema, 1)]
    nodes = 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > limits.nodes:
            raise InvalidOptions(
                f"{described(field)} has more than {limits.nodes} values (MYLLM_MAX_SCHEMA_NODES)", field=field
            )
        if depth > limits.depth:
            raise InvalidOptions(
                f"{described(field)} nests deeper than {limits.depth} levels (MYLLM_MAX_SCHEMA_DEPTH)", field=field
            )
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _count(value: Any, default: int = 0) -> int | None:
    """A repetition count as the converter uses it: an int (a bool is one); anything else makes
    it fail by itself (None here, which adds nothing)."""
    if isinstance(value, bool | int):
        return int(value)
    return None


def repetition(unit: int, low: int, high: int | None, separator: int = 0, literal: bool = False) -> int:
    """The length of `_build_repetition`'s output for an item (or a quoted literal) of `unit`
    characters, `low` to `high` times (None: unbounded), with a separator of `separator`
    characters (0: none)."""
    low = max(low, 0)
    if not separator and ((low == 0 and high == 1) or (low == 1 and high is None)):
        return unit + 1
    size = 0
    if low > 0:
        size = (unit - 2) * low + 2 if literal and not separator else low * unit + (low - 1) * (separator + 2 if separator else 1)
        if high != low:
            size += 1
    if high is None:
        return size + unit + separator + 4
    extra = max(high - low, 0)
    return size + extra * (unit + (separator + 1 if separator else 0) + 4)


@dataclass
class _Estimate:
    """The converter's walk (`SchemaConverter.visit`) with the length of each name and rule in
    place of the strings; `total` is the grammar's length so far."""

    root: dict[str, Any]
    limits: SchemaLimits
    total: int = 0
    cause: str = ""
    bound: int = 0
    """Where measuring stops: a quarter above the bound, so that an estimate a little high never
    refuses a schema the converter would turn into a grammar within it."""
    resolved: set[str] = field(default_factory=set)

    def add(self, size: int, what: str = "") -> None:
        self.total += size
        if self.total > self.bound:
            self.cause = self.cause or what
            raise _TooLarge()

    def rule(self, name: int, content: int, what: str = "") -> int:
        """`_add_rule`: a line `name ::= content`; the name is what refers to it."""
        self.add(name + content + 5, what)
        return name

    def visit(self, schema: Any, name: int, depth: int) -> int:
        """The length of the name that refers to `schema`'s rule. `depth` counts the converter's
        recursion, `$ref` hops included, which the converter does not bound."""
        if not isinstance(schema, dict):
            return 0  # the converter fails on it by itself
        if depth > self.limits.depth:
            self.cause = "nested schemas and $ref chains deeper than MYLLM_MAX_SCHEMA_DEPTH"
            raise _TooLarge()
        kind = schema.get("type")
        rule_name = max(name, 4)
        if (ref := schema.get("$ref")) is not None:
            return self.rule(rule_name, self.ref(ref, depth))
        if "oneOf" in schema or "anyOf" in schema:
            alternatives = schema.get("oneOf") or schema.get("anyOf")
            if not isinstance(alternatives, list):
                return 0
            names = [self.visit(alt, (name + 1 if name else 12) + len(str(i)), depth + 1) for i, alt in enumerate(alternatives)]
            return self.rule(rule_name, sum(names) + 3 * len(names), "anyOf/oneOf")
        if isinstance(kind, list):
            return self.rule(rule_name, 10 * len(kind))
        if "const" in schema:
            return self.rule(rule_name, self.literal(schema["const"]), "const")
        if "enum" in schema:
            values = schema["enum"] if isinstance(schema["enum"], list) else []
            return self.rule(rule_name, sum(self.literal(v) + 3 for v in values), "enum")
        if kind in (None, "object") and ("properties" in schema or (
                "additionalProperties" in schema and schema["additionalProperties"] is not True)):
            properties = schema.get("properties", {})
            required = schema.get("required", [])
            return self.rule(rule_name, self.object(
                list(properties.items()) if isinstance(properties, dict) else [],
                set(required) if isinstance(required, list) and all(isinstance(r, str) for r in required) else set(),
                name, schema.get("additionalProperties"), depth,
            ))
        if kind in (None, "object") and "allOf" in schema:
            properties, required = [], set()
            for part in schema["allOf"] if isinstance(schema["allOf"], list) else []:
                for component, is_required in self.components(part):
                    items = component.get("properties", {})
                    for key, value in items.items() if isinstance(items, dict) else ():
                        properties.append((key, value))
                        if is_required:
                            required.add(key)
            return self.rule(rule_name, self.object(properties, required, name, [], depth))
        if kind in (None, "array") and ("items" in schema or "prefixItems" in schema):
            items = schema.get("items") or schema.get("prefixItems")
            if isinstance(items, list):
                names = [self.visit(item, _child(name, 6 + len(str(i))), depth + 1) for i, item in enumerate(items)]
                return self.rule(rule_name, sum(names) + 12 * len(names) + 20)
            item = self.visit(items, _child(name, 4), depth + 1)
            low, high = _count(schema.get("minItems", 0)), schema.get("maxItems")
            high_count = None if high is None else _count(high)
            if low is None or (high is not None and high_count is None):
                return 0
            return self.rule(rule_name, repetition(item, low, high_count, separator=11) + 20, "minItems/maxItems")
        if kind in (None, "string") and "pattern" in schema:
            pattern = schema["pattern"]
            return self.rule(rule_name, self.pattern(pattern, rule_name) if isinstance(pattern, str) else 0, "pattern")
        if kind == "string" and ("minLength" in schema or "maxLength" in schema):
            low, high = _count(schema.get("minLength", 0)), schema.get("maxLength")
            high_count = None if high is None else _count(high)
            if low is None or (high is not None and high_count is None):
                return 0
            return self.rule(rule_name, repetition(4, low, high_count) + 14, "minLength/maxLength")
        return self.rule(rule_name, 8)

    def components(self, part: Any) -> list[tuple[dict[str, Any], bool]]:
        """`allOf`'s parts as the converter merges them: an `anyOf` inside one is optional."""
        if not isinstance(part, dict):
            return []
        found = [(p, False) for p in part["anyOf"]] if isinstance(part.get("anyOf"), list) else [(part, True)]
        return [(self.target(c["$ref"]) if "$ref" in c else c, r) for c, r in found if isinstance(c, dict)]

    def literal(self, value: Any) -> int:
        """A constant as the converter quotes it (its JSON, escaped)."""
        text = json.dumps(value)
        return len(text) + text.count('"') + 2

    def target(self, ref: Any) -> Any:
        """The schema a local `$ref` points to (None when the converter would fail on it)."""
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return None
        node: Any = self.root
        for part in ref.split("#")[-1].split("/")[1:]:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node

    def ref(self, ref: Any, depth: int) -> int:
        """`_resolve_ref`: the target is visited once, under the ref's last segment."""
        if not isinstance(ref, str):
            return 0
        ref_name = ref.split("/")[-1]
        if ref_name not in self.resolved:
            self.resolved.add(ref_name)
            self.visit(self.target(ref), len(ref_name), depth + 1)
        return len(ref_name)

    def object(self, properties: list[tuple[Any, Any]], required: set[str], name: int, additional: Any, depth: int) -> int:
        """`_build_object_rule`: a `-kv` rule per property, the optional ones chained by `-rest`
        rules; the returned figure is the object rule's own length."""
        kv: dict[Any, int] = {}
        for key, value in properties:
            if not isinstance(key, str):
                return 0
            prop = _child(name, _escaped(key))
            value_name = self.visit(value, prop, depth + 1)
            kv[key] = self.rule(prop + 3, self.literal(key) + 15 + value_name, "properties")
        optional = [key for key in kv if key not in required]
        if additional is True or isinstance(additional, dict):
            value_name = self.visit({} if additional is True else additional, name + 17, depth + 1)
            kv["*"] = self.rule(name + 14, value_name + 20)
            optional.append("*")
        size = 20 + sum(kv[key] + 11 for key in kv if key in required)
        for i, key in enumerate(optional):  # each optional key starts an alternative, and has a `-rest` rule after it
            size += kv[key] + name + 6 + 3
            if i + 1 < len(optional):
                self.rule(_child(name, _escaped(str(key)) + 5), kv[optional[i + 1]] + name + 20, "properties")
        return size

    def pattern(self, pattern: str, name: int) -> int:
        """`_visit_pattern`, scanning the pattern as it does. Sequences are lists of (length,
        is a literal); a `{m,n}` repeats a literal's text, or the name of a sub-rule holding
        anything else. The converter never returns on `]` or `}` where an item starts: refused."""
        if not (pattern.startswith("^") and pattern.endswith("$")) or len(pattern) < 2:
            return 0
        if len(pattern) > self.bound:  # every character becomes at least one of the grammar's
            self.cause = "pattern"
            raise _TooLarge()
        text, i, n, subrules = pattern[1:-1], 0, len(pattern) - 2, 0
        stack: list[list[tuple[int, bool]]] = [[]]
        while i < n:
            c, seq = text[i], stack[-1]
            if c == ".":
                seq.append((3, False))
                i += 1
            elif c == "(":
                i += 1
                if i < n and text[i] == "?":
                    return 0
                stack.append([])
            elif c == ")":
                i += 1
                if len(stack) == 1:
                    return 0
                inner = _joined(stack.pop())
                stack[-1].append((inner + 2, False))
            elif c == "[":
                start = i
                i += 1
                while i < n and text[i] != "]":
                    i += 2 if text[i] == "\\" else 1
                if i >= n:
                    return 0
                i += 1
                seq.append((i - start, False))
            elif c == "|":
                seq.append((1, False))
                i += 1
            elif c in "*+?":
                if not seq:
                    return 0
                seq[-1] = (_rule_size(seq[-1]) + 1, False)
                i += 1
            elif c == "{":
                close = text.find("}", i)
                if close < 0 or not seq:
                    return 0
                bounds = [s.strip() for s in text[i + 1: close].split(",")]
                i = close + 1
                if len(bounds) > 2:
                    return 0
                low = _quantity(bounds[0]) if len(bounds) == 2 else _quantity(bounds[0], empty=None)
                high = low if len(bounds) == 1 else _quantity(bounds[1], empty=None)
                if low is None:
                    return 0
                size, is_literal = seq[-1]
                if not is_literal:
                    subrules += 1
                    self.rule(name + 1 + len(str(subrules)), size, "pattern")
                    size = name + 1 + len(str(subrules))
                seq[-1] = (repetition(size + 2 if is_literal else size, low, high, literal=is_literal), False)
                if seq[-1][0] > self.bound:
                    self.cause = "a {m,n} in pattern"
                    raise _TooLarge()
            else:
                start_len, length = i, 0
                while i < n:
                    if text[i] == "\\" and i < n - 1:
                        length += 1 if text[i + 1] in _ESCAPED_IN_REGEX else 2
                        i += 2
                    elif text[i] == '"':
                        length += 2
                        i += 1
                    elif text[i] not in _NON_LITERAL and (
                            i == n - 1 or length == 0 or text[i + 1] == "." or text[i + 1] not in _NON_LITERAL):
                        length += 1
                        i += 1
                    else:
                        break
                if i == start_len:
                    raise _Unsupported(f"the pattern has '{c}' at index {i + 1} where an item starts (escape it)")
                seq.append((length, True))
        while len(stack) > 1:  # the converter closes what the pattern left open
            inner = _joined(stack.pop())
            stack[-1].append((inner + 2, False))
        return _joined(stack[0]) + 12


def _child(name: int, part: int) -> int:
    """The length of `f"{name}{'-' if name else ''}{part}"`, the converter's names of parts."""
    return name + (1 if name else 0) + part


def _escaped(key: str) -> int:
    """The length a property name has in a rule name."""
    return len(_INVALID_RULE_CHARS.sub("-", key))


def _rule_size(item: tuple[int, bool]) -> int:
    size, is_literal = item
    return size + 2 if is_literal else size


def _joined(seq: list[tuple[int, bool]]) -> int:
    return sum(_rule_size(item) for item in seq) + max(len(seq) - 1, 0)


def _quantity(text: str, empty: int | None = 0) -> int | None:
    """A quantifier's number as `int()` reads it in the converter; more digits than any grammar
    could hold count as `_HUGE`."""
    if not text:
        return empty
    if len(text) > 12:
        return _HUGE if text.isdigit() else None
    try:
        return max(int(text), 0)
    except ValueError:
        return None
