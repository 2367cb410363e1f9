"""Chat prompts from a model's own Jinja2 chat template (what GGUF carries), with a fallback
chosen by family for models that have none, such as base models."""

from __future__ import annotations

import dataclasses
import logging
import re
import secrets
from dataclasses import dataclass
from typing import Any

from myllm.errors import InvalidOptions
from myllm.registry.chat_templates import Deadline, compile_template, render
from myllm.registry.schema import ModelRow

log = logging.getLogger(__name__)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Gemma's turn format; a system message is folded into the first user turn, as Gemma's own
# template does, since Gemma has no system role.
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Fallback:
    name: str
    template: str
    stop: tuple[str, ...]
    """End-of-turn markers: a base model's EOS token is not its turn end."""


FALLBACKS = {
    "gemma": Fallback("gemma", GEMMA, ("<end_of_turn>",)),
    "chatml": Fallback("chatml", CHATML, ("<|im_end|>",)),
}
FAMILY_FALLBACK = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma"}


def fallback_for(family: str) -> Fallback:
    """Gemma families get Gemma turns; everything else ChatML, the most widely trained format."""
    return FALLBACKS[FAMILY_FALLBACK.get(family, "chatml")]


def template_name(template: str | None, family: str) -> str:
    """A short name for a chat template, as people call them."""
    if not template:
        return fallback_for(family).name
    markers = (
        ("<|im_start|>", "chatml"),
        ("<|start_header_id|>", "llama3"),
        ("<|channel|>", "harmony"),
        ("<start_of_turn>", "gemma"),
        ("<｜User｜>", "deepseek"),
        ("<<SYS>>", "llama2"),
        ("[INST]", "mistral"),
        ("<|end|>", "phi3"),
        ("<|user|>", "zephyr"),
    )
    return next((name for marker, name in markers if marker in template), "custom")


@dataclass(frozen=True)
class Markup:
    """How a chat template's model marks its reasoning, for the engine's split (the daemon makes
    the engine's `Thinking` of it): the section's markers, and what the engine writes to close
    it when the budget is spent."""

    open: str
    close: str
    answer: str
    """What follows `close` before the answer: past the budget the engine writes `close` and
    this, and a format's grammar starts after both."""
    headers: tuple[str, ...] = ()
    """Markup the model writes outside the section that is not answer text (the headers of
    gpt-oss's messages): dropped from the answer."""
    optional: bool = True
    """Whether the template can turn thinking off; gpt-oss's cannot (it reads only an effort)."""

    @property
    def closing(self) -> str:
        """What closes the section before the answer: what a prompt with thinking off ends with."""
        return self.close + self.answer


THINK = Markup("<think>", "</think>", "\n\n")
"""DeepSeek-R1's and Qwen3's families (and most others): `<think>`...`</think>`, then the answer."""

HARMONY = Markup(
    "<|channel|>analysis<|message|>", "<|end|>", "<|start|>assistant<|channel|>final<|message|>",
    ("<|start|>assistant", "<|channel|>final<|message|>"), optional=False,
)
"""gpt-oss's harmony format: each message is `<|start|>assistant<|channel|>NAME<|message|>`...
`<|end|>`; the thinking is the `analysis` channel, the answer the `final` one (ending with
`<|return|>`, an end of generation). The prompt ends with `<|start|>assistant`, so the model
opens the analysis channel itself; `reasoning_effort` ("low", "medium", "high") becomes the
system message's `Reasoning:` line, and there is no way to turn thinking off (as llama.cpp's
common/chat.cpp parses it: thinking from `<|channel|>analysis<|message|>` to `<|end|>`)."""

Think = bool | str | None
"""A request's thinking: None (the model's default), on or off, or a level ("low", "medium",
"high") for templates that read one."""


def thinking_markup(template: str | None) -> Markup | None:
    """How a chat template's model thinks, if it does: gpt-oss's analysis channel, or a
    `<think>`...`</think>` section (as Ollama decides a model can think)."""
    if not template:
        return None
    if HARMONY.open in template:
        return HARMONY
    if THINK.open in template and THINK.close in template:
        return THINK
    return None


def thinks(template: str | None) -> bool:
    """Whether a chat template's model can think (the `thinking` capability)."""
    return thinking_markup(template) is not None


def splits_thinking(template: str | None, think: Think) -> bool:
    """Whether the output of a request with `think` is split into thinking and answer: a model
    that thinks, unless thinking is off and its template can turn it off (gpt-oss thinks anyway,
    and its thinking still comes apart)."""
    markup = thinking_markup(template)
    return markup is not None and (think is not False or not markup.optional)


def check_think(row: ModelRow, think: Think, field: str) -> None:
    """Thinking asked of a model that cannot think is refused, a 400 naming the API's own
    `field`, as Ollama and OpenAI refuse it: one check for every API that refuses it."""
    if think and not thinks(row.template):
        raise InvalidOptions(f'"{row.name}" does not support thinking', field=field)


Part = tuple[str, bool]
"""A piece of a prompt and whether special tokens in it are parsed (the template's markup) or
not (a message's content, tokenized as text so it cannot forge a turn)."""


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    stop: tuple[str, ...]
    units: tuple[tuple[Part, ...], ...]
    """The prompt cut after each message's content: `units[i]` ends with message i's content
    (the markup before it included), the last unit is what follows the last message. Joined,
    the parts are `text`. Trimming drops whole units; tokenizing counts each once."""
    marked: bool
    """Whether contents were found in the output (False: the template moved or rewrote them,
    and the whole prompt is one markup part, parsed as before)."""
    thinking_open: bool = False
    """The prompt ends inside an opened reasoning section: the model's output starts as thinking."""


def _mark(messages: list[dict[str, Any]], nonce: str) -> list[dict[str, Any]]:
    """Each content between an opening and a closing marker no client can guess. Whitespace
    around the content stays outside the markers, so a template that trims contents trims
    the same characters it would without them."""
    marked = []
    for i, msg in enumerate(messages):
        content = msg["content"]
        core = content.strip()
        if core:
            start = content.index(core)
            content = f"{content[:start]}\ue000{nonce}{i}\ue001{core}\ue000{nonce}{i}\ue002{content[start + len(core):]}"
        marked.append({**msg, "content": content})
    return marked


def _split(text: str, nonce: str, messages: list[dict[str, Any]]) -> tuple[tuple[Part, ...], ...] | None:
    """The marked output as units (see `RenderedPrompt.units`); None unless every marker is
    where a template that copies each content once, in order, would put it. Whitespace around
    a content that the template kept goes back into the content's part, so the parts tokenize
    as the whole text would."""
    units: list[tuple[Part, ...]] = [() for _ in messages]
    parts: list[Part] = []
    pos, last, inside, lead = 0, -1, None, ""
    for match in re.finditer(f"\ue000{nonce}(\\d+)([\ue001\ue002])", text):
        index, opening = int(match.group(1)), match.group(2) == "\ue001"
        piece = text[pos : match.start()]
        pos = match.end()
        if opening:
            if inside is not None or index <= last or index >= len(messages):
                return None
            content = messages[index]["content"]
            lead = content[: len(content) - len(content.lstrip())]
            if lead and piece.endswith(lead):
                piece = piece[: -len(lead)]
            else:
                lead = ""
            if piece:
                parts.append((piece, True))
            inside = index
        else:
            if inside != index:
                return None
            content = messages[index]["content"]
            trail = content[len(content.rstrip()) :]
            if not (trail and text.startswith(trail, pos)):
                trail = ""
            pos += len(trail)
            parts.append((lead + piece + trail, False))
            units[index] = tuple(parts)
            parts, last, inside = [], index, None
    if inside is not None or "\ue000" + nonce in text[pos:]:
        return None
    if text[pos:]:
        parts.append((text[pos:], True))
    return (*units, tuple(parts))


def render_chat(
    messages: list[dict[str, Any]],
    template: str | None,
    family: str,
    bos_token: str | None,
    eos_token: str | None,
    add_generation_prompt: bool = True,
    deadline: Deadline | None = None,
    tools: list[dict[str, Any]] | None = None,
    think: Think = None,
) -> RenderedPrompt:
    """`think`, for a template with a reasoning section: the variables templates read it from
    (Qwen3's `enable_thinking`, true unless thinking is off, as llama-server passes it; a level
    as `reasoning_effort`, gpt-oss's `Reasoning:` line); off, a section the prompt still opens
    is closed at once, empty, so the model answers directly (where the template can turn it off:
    see `Markup.optional`)."""
    rendered = _render_chat(messages, template, family, bos_token, eos_token, add_generation_prompt, deadline, tools, think)
    markup = thinking_markup(template)
    if markup is None or not rendered.text.rstrip().endswith(markup.open):
        return rendered
    if think is False and markup.optional:
        units = (*rendered.units[:-1], (*rendered.units[-1], (markup.closing, True)))
        return dataclasses.replace(rendered, text=rendered.text + markup.closing, units=units)
    return dataclasses.replace(rendered, thinking_open=True)


def _render_chat(
    messages: list[dict[str, Any]], template: str | None, family: str, bos_token: str | None, eos_token: str | None,
    add_generation_prompt: bool, deadline: Deadline | None, tools: list[dict[str, Any]] | None, think: Think,
) -> RenderedPrompt:
    stop: tuple[str, ...] = ()
    if not template:
        fallback = fallback_for(family)
        template, stop = fallback.template, fallback.stop
    compiled = compile_template(template)
    context = {"bos_token": bos_token or "", "eos_token": eos_token or "", "add_generation_prompt": add_generation_prompt}
    if tools:
        context["tools"] = tools
    # Always set, as llama-server sets it: some templates read an unset one as off.
    context["enable_thinking"] = think is not False
    if isinstance(think, str):
        context["reasoning_effort"] = think
    nonce = secrets.token_hex(6)
    units = _split(render(compiled, _mark(messages, nonce), deadline, **context), nonce, messages)
    if units is not None:
        return RenderedPrompt("".join(text for unit in units for text, _ in unit), stop, units, True)
    log.warning("the chat template does not copy message contents as they are; special tokens in them are parsed")
    text = render(compiled, messages, deadline, **context)
    return RenderedPrompt(text, stop, (*(() for _ in messages), ((text, True),)), False)

