"""Chat prompts from a model's own Jinja2 chat template (what GGUF carries), with a fallback
chosen by family for models that have none, such as base models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from myllm.errors import InvalidOptions

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
        ("<start_of_turn>", "gemma"),
        ("<｜User｜>", "deepseek"),
        ("<<SYS>>", "llama2"),
        ("[INST]", "mistral"),
        ("<|end|>", "phi3"),
        ("<|user|>", "zephyr"),
    )
    return next((name for marker, name in markers if marker in template), "custom")


def _raise(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=32)
def compile_template(template: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env.from_string(template)


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    stop: tuple[str, ...]


def render_chat(
    messages: list[dict[str, str]],
    template: str | None,
    family: str,
    bos_token: str | None,
    eos_token: str | None,
    add_generation_prompt: bool = True,
) -> RenderedPrompt:
    stop: tuple[str, ...] = ()
    if not template:
        fallback = fallback_for(family)
        template, stop = fallback.template, fallback.stop
    try:
        text = compile_template(template).render(
            messages=messages,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            add_generation_prompt=add_generation_prompt,
        )
    except TemplateError as exc:
        # Templates raise for conversations they do not support (e.g. roles out of order).
        raise InvalidOptions(f"the model's chat template rejected the messages: {exc}", field="messages") from exc
    return RenderedPrompt(text, stop)
