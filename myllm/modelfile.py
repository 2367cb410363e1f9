"""Ollama's Modelfile format, for `myllm create`.

    FROM smollm2:135m            # a registered name, or a .gguf path (relative to the Modelfile)
    FROM ./mmproj.gguf           # a second FROM: the model's multimodal projector (Ollama's way)
    ADAPTER ./tutor-lora.gguf    # a LoRA adapter (GGUF) applied over the model; may repeat
    DRAFT smollm2:135m           # a registered model of the same vocabulary, drafting for speculative decoding
    PARAMETER temperature 0.7    # any option a model's defaults may set (runtime/request/options.py PARAMETERS)
    PARAMETER stop "<|im_end|>"  # stop may repeat
    TEMPLATE \"\"\"...\"\"\"           # a Jinja2 chat template (what GGUF files carry)
    SYSTEM \"\"\"...\"\"\"
    MESSAGE user Hello           # seed conversation
    LICENSE \"\"\"...\"\"\"

Instructions are case-insensitive; `#` starts a comment line; a value may be bare (to the end
of the line), "quoted", or a \"\"\"block\"\"\" over several lines. Errors name the line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateSyntaxError

from myllm.errors import InvalidOptions, MyLLMError
from myllm.runtime.request.options import PARAMETERS, stored_parameter

ROLES = ("system", "user", "assistant")
INSTRUCTIONS = ("FROM", "ADAPTER", "PARAMETER", "TEMPLATE", "SYSTEM", "MESSAGE", "LICENSE", "DRAFT")


class ModelfileError(MyLLMError):
    status = 400
    code = "invalid_modelfile"

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"Modelfile line {line}: {message}")
        self.line = line


@dataclass
class Modelfile:
    base: str = ""
    projector: str | None = None
    """A second FROM: the model's projector (an `mmproj` GGUF, architecture clip). Ollama tells a
    model's files apart by their contents, in any order: so does `myllm create` (create.py)."""
    adapters: list[str] = field(default_factory=list)
    """ADAPTER lines: LoRA adapter files (GGUF), relative to the Modelfile, in order."""
    parameters: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    license: str | None = None
    draft: str | None = None
    """A registered model drafting for this one (speculative decoding; registry/drafts.py checks it)."""


def _value(text: str, lines: list[str], index: int) -> tuple[str, int]:
    """The value starting at `text` on line `index`; returns it and the last line used."""
    text = text.strip()
    if text.startswith('"""'):
        rest = text[3:]
        if '"""' in rest:
            return rest[: rest.index('"""')], index
        parts = [rest]
        for j in range(index + 1, len(lines)):
            if '"""' in lines[j]:
                parts.append(lines[j][: lines[j].index('"""')])
                return "\n".join(parts).strip("\n"), j
            parts.append(lines[j])
        raise ModelfileError(index + 1, 'unterminated """ block')
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].replace('\\"', '"').replace("\\n", "\n"), index
    return text, index


def parse(text: str) -> Modelfile:
    lines = text.splitlines()
    mf = Modelfile()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        number = i + 1
        if not line or line.startswith("#"):
            i += 1
            continue
        word, _, rest = line.partition(" ")
        op = word.upper()
        if op not in INSTRUCTIONS:
            raise ModelfileError(number, f"unknown instruction {word!r} (use {', '.join(INSTRUCTIONS)})")
        if not rest.strip():
            raise ModelfileError(number, f"{op} needs a value")
        if op == "PARAMETER":
            name, _, raw = rest.strip().partition(" ")
            value, i = _value(raw, lines, i)
            _parameter(mf, number, name.lower(), value)
        elif op == "MESSAGE":
            role, _, raw = rest.strip().partition(" ")
            if role.lower() not in ROLES:
                raise ModelfileError(number, f"MESSAGE role must be one of {', '.join(ROLES)} (got {role!r})")
            value, i = _value(raw, lines, i)
            mf.messages.append({"role": role.lower(), "content": value})
        else:
            value, i = _value(rest, lines, i)
            if op == "FROM":
                if mf.projector is not None:
                    raise ModelfileError(number, "at most two FROM lines: a model and its projector")
                if mf.base:
                    mf.projector = value
                else:
                    mf.base = value
            elif op == "ADAPTER":
                mf.adapters.append(value)
            elif op == "TEMPLATE":
                _check_template(number, value)
                mf.template = value
            elif op == "SYSTEM":
                mf.system = value
            elif op == "DRAFT":
                mf.draft = value
            else:
                mf.license = value
        i += 1
    if not mf.base:
        raise ModelfileError(1, "no FROM line: name the model (or .gguf file) to build on")
    return mf


def _parameter(mf: Modelfile, number: int, name: str, value: str) -> None:
    """Typed and range-checked by `GenerationOptions`, stored under the name the Modelfile
    used (`num_predict` stays `num_predict`, as `myllm show` prints it back)."""
    if name not in PARAMETERS:
        raise ModelfileError(number, f"unknown PARAMETER {name!r} (use {', '.join(PARAMETERS)})")
    given: str | list[str] = [*mf.parameters.get("stop", []), value] if name == "stop" else value  # stop repeats
    try:
        mf.parameters[name] = stored_parameter(name, given)
    except InvalidOptions as exc:
        raise ModelfileError(number, exc.message) from None


def _check_template(number: int, template: str) -> None:
    from myllm.registry.chat_templates import check_template

    try:
        check_template(template)
    except TemplateSyntaxError as exc:
        raise ModelfileError(number + (exc.lineno or 1) - 1, f"TEMPLATE is not valid Jinja2: {exc.message}") from None
    except InvalidOptions as exc:
        raise ModelfileError(number, exc.message) from None



def render(mf: Modelfile) -> str:
    """The Modelfile text that `parse` reads back as `mf`, what Ollama's `show` answers as a
    model's `modelfile`."""
    lines = [f"FROM {mf.base}", *([f"FROM {mf.projector}"] if mf.projector else [])]
    lines += [f"ADAPTER {adapter}" for adapter in mf.adapters]
    if mf.template:
        lines.append(f"TEMPLATE {_long(mf.template)}")
    if mf.system:
        lines.append(f"SYSTEM {_long(mf.system)}")
    for name, value in mf.parameters.items():
        lines += [f"PARAMETER {name} {_quoted(item)}" for item in (value if isinstance(value, list) else [value])]
    lines += [f"MESSAGE {m['role']} {_quoted(m['content'])}" for m in mf.messages]
    if mf.license:
        lines.append(f"LICENSE {_long(mf.license)}")
    if mf.draft:
        lines.append(f"DRAFT {mf.draft}")
    return "\n".join(lines) + "\n"


def _long(text: str) -> str:
    """A long text as `_value` reads it back: a \"\"\" block, which keeps it verbatim (a chat
    template's `'\\n'` included), unless the block could not hold it."""
    if '"""' in text or text.endswith('"') or text != text.strip("\n"):
        return _quoted(text)
    return f'"""{text}"""'


def _quoted(value: object) -> str:
    """A one-line value as `_value` reads it back: a string in quotes, with its quotes and
    line breaks escaped; a number as it is."""
    if not isinstance(value, str):
        return str(value)
    return '"' + value.replace('"', '\\"').replace("\n", "\\n") + '"'
