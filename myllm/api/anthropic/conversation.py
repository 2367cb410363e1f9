"""An Anthropic conversation (`system` and `messages`) as the runtime's messages: text blocks
joined as paragraphs, tool use as tool calls, tool results as tool messages, images as image
bytes among a message's text (`images.Content`), where they were among its blocks.

An image's bytes are checked here only against what Anthropic's document says of its block
(a base64 image is the `media_type` it names); whether they are an image the model may see
(format, size, pixels, count) is the runtime's check, a 400 like this one.
"""

from __future__ import annotations

from typing import Any

from myllm.api.anthropic.models import (
    Base64Source,
    ImageBlock,
    InputMessage,
    RedactedThinkingBlock,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from myllm.errors import InvalidOptions
from myllm.runtime.request.images import Content, from_base64, from_url

PARAGRAPH = "\n\n"
"""What joins a turn's text blocks: they are separate paragraphs to the reader (a document,
then a question), and consecutive turns of one role become one."""

SIGNATURES = {"image/png": (b"\x89PNG\r\n\x1a\n",), "image/jpeg": (b"\xff\xd8\xff",), "image/gif": (b"GIF87a", b"GIF89a")}
"""How each media type's files start (WebP's is split: see `_sniffed`)."""


def _text(content: str | list[TextBlock]) -> str:
    return content if isinstance(content, str) else PARAGRAPH.join(block.text for block in content)


def _content(pieces: list[str | bytes]) -> Content:
    """A turn's blocks as one content: adjacent text blocks are paragraphs; an image sits where
    its block was, with no text added around it (as Ollama's and OpenAI's images do)."""
    out: list[str | bytes] = []
    for piece in pieces:
        last = out[-1] if out else None
        if isinstance(piece, str) and isinstance(last, str):
            out[-1] = last + PARAGRAPH + piece
        else:
            out.append(piece)
    if all(isinstance(piece, str) for piece in out):
        return "".join(piece for piece in out if isinstance(piece, str))
    return out


def _pieces(content: Content) -> list[str | bytes]:
    return [content] if isinstance(content, str) else content


def _sniffed(data: bytes) -> str | None:
    """The media type of Anthropic's four that `data` starts as, if any."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for kind, heads in SIGNATURES.items() if data.startswith(heads)), None)


def _image(block: ImageBlock, field: str) -> bytes:
    """An image block's bytes. A base64 image whose bytes are another of the four formats than
    its `media_type` says is refused, as Anthropic refuses it; bytes of no known format are left
    for the runtime to name (not an image, an unsupported format)."""
    source = block.source
    if not isinstance(source, Base64Source):
        return from_url(source.url, f"{field}.source.url")
    data = from_base64(source.data)
    found = _sniffed(data)
    if found is not None and found != source.media_type:
        raise InvalidOptions(f"{field}.source: the image was specified using the {source.media_type} media type, "
                             f"but the image appears to be a {found} image", field=f"{field}.source.media_type")
    return data


def messages_of(system: str | list[TextBlock] | None, messages: list[InputMessage]) -> tuple[list[dict[str, Any]], str]:
    """The conversation as the runtime's messages, and the prefill: a last assistant turn
    without tool use is the start of the reply, which continues it (as Anthropic's does)."""
    out = [{"role": "system", "content": _text(system)}] if system else []
    called: dict[str, str] = {}  # function names by tool_use id: a tool result names its function
    for i, msg in enumerate(messages):
        if isinstance(msg.content, str):
            turns = [{"role": msg.role, "content": msg.content}]
        elif msg.role == "assistant":
            turns = [_assistant(msg.content, called, i)]
        else:
            turns = _user(msg.content, called, i)
        for turn in turns:
            _append(out, turn)
    if messages and messages[-1].role == "assistant" and not out[-1].get("tool_calls"):
        return out[:-1], out[-1]["content"]
    return out, ""


def _append(out: list[dict[str, Any]], turn: dict[str, Any]) -> None:
    """Consecutive turns of one role are one turn, as Anthropic combines them (and some chat
    templates refuse two in a row); a turn after tool calls stays apart, after them."""
    last = out[-1] if out else None
    if last is None or last["role"] != turn["role"] or turn["role"] not in ("user", "assistant") or last.get("tool_calls"):
        out.append(turn)
        return
    pieces = [piece for content in (last["content"], turn["content"]) if content for piece in _pieces(content)]
    out[-1] = {**turn, "content": _content(pieces)}


def _assistant(blocks: list[Any], called: dict[str, str], index: int) -> dict[str, Any]:
    texts, calls = [], []
    for j, block in enumerate(blocks):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            called[block.id] = block.name
            calls.append({"id": block.id, "type": "function", "function": {"name": block.name, "arguments": block.input}})
        elif isinstance(block, ThinkingBlock | RedactedThinkingBlock):
            continue  # an earlier answer's thinking, sent back: the templates leave it out
        else:
            raise InvalidOptions(f"messages[{index}].content[{j}]: an assistant turn cannot hold {block.type} blocks",
                                 field=f"messages[{index}].content")
    message: dict[str, Any] = {"role": "assistant", "content": PARAGRAPH.join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def _user(blocks: list[Any], called: dict[str, str], index: int) -> list[dict[str, Any]]:
    """A user turn: each tool result a tool message, the text and images around them user
    messages."""
    out: list[dict[str, Any]] = []
    pieces: list[str | bytes] = []
    for j, block in enumerate(blocks):
        field = f"messages[{index}].content[{j}]"
        if isinstance(block, TextBlock):
            pieces.append(block.text)
        elif isinstance(block, ImageBlock):
            pieces.append(_image(block, field))
        elif isinstance(block, ToolResultBlock):
            if block.tool_use_id not in called:
                raise InvalidOptions(f"{field}.tool_use_id {block.tool_use_id!r} answers no earlier tool_use",
                                     field=f"messages[{index}].content")
            if pieces:
                out.append({"role": "user", "content": _content(pieces)})
                pieces = []
            out.append({"role": "tool", "name": called[block.tool_use_id], "content": _result(block, field)})
        else:
            raise InvalidOptions(f"{field}: a user turn cannot hold {block.type} blocks",
                                 field=f"messages[{index}].content")
    if pieces or not out:
        out.append({"role": "user", "content": _content(pieces)})
    return out


def _result(block: ToolResultBlock, field: str) -> Content:
    """A tool result's text and images; an error's says so first."""
    if isinstance(block.content, str):
        pieces: list[str | bytes] = [block.content]
    else:
        pieces = [part.text if isinstance(part, TextBlock) else _image(part, f"{field}.content[{k}]")
                  for k, part in enumerate(block.content)]
    content = _content(pieces)
    if not block.is_error:
        return content
    return f"Error: {content}" if isinstance(content, str) else ["Error: ", *content]
