"""`myllm run`: one answer for a prompt, or an interactive chat kept in a daemon session."""

from __future__ import annotations

import base64
import sys
import uuid
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from rich.console import Console

from cli.client import Client, DaemonError
from cli.images import Attached, UnreadableImage, attach, leads_with_image, mentions
from cli.render import AnswerWriter
from myllm.errors import InvalidOptions
from myllm.runtime.request.options import ALIASES, PARAMETERS, parameter_value

if TYPE_CHECKING:
    from myllm.runtime.request.template import Think

LEVELS = ("low", "medium", "high")

HELP = f"""Available commands:
  /set parameter NAME VALUE   set an option ({', '.join(PARAMETERS)})
  /set think [LEVEL]          a thinking model thinks first, shown dimmed (LEVEL: {', '.join(LEVELS)})
  /set nothink                it answers without thinking
  /show info                  show the model's details
  /clear                      start a new session (forget the conversation)
  /bye                        exit
  /?                          this help

Use \"\"\" to begin and end a multi-line message. Ctrl-C stops an answer; Ctrl-D or /bye exits."""
IMAGES_HELP = "A path to a .png, .jpg, .jpeg, .webp or .gif file in a message sends that image (quote one with spaces)."


def print_stream(events: Generator[dict[str, Any], None, None], writer: AnswerWriter) -> dict[str, Any] | None:
    """Write thinking and answer events as they come; returns the final event. Ctrl-C stops
    the answer (closing the stream cancels it in the daemon) and returns None."""
    try:
        for event in events:
            if "error" in event:
                writer.end_thinking()
                writer.out.write(f"\nError: {event['error']}\n")
                return None
            if event.get("done"):
                writer.end_thinking()
                writer.out.write("\n")
                writer.out.flush()
                return event
            if "thinking" in event:
                writer.thinking(event["thinking"])
            else:
                writer.answer(event["token"])
    except KeyboardInterrupt:
        events.close()
        writer.end_thinking()
        writer.out.write("\n")
    return None


def answer_writer() -> AnswerWriter:
    return AnswerWriter(sys.stdout, sys.stderr, sys.stdout.isatty())


def think_field(think: Think) -> dict[str, Think]:
    """A request's `think`: left out when not chosen, so the model's default holds."""
    return {} if think is None else {"think": think}


def cannot_think(client: Client, model: str) -> bool:
    """Whether the model cannot think (the daemon's `thinking`: its template has no reasoning
    section). The daemon refuses `think` for such a model; the CLI says so and asks without it."""
    return not client.get(f"/api/models/{model}").get("thinking")


def sees(client: Client, model: str) -> bool:
    """Whether the model takes images (the daemon's `vision`: it has a projector). As in Ollama's
    CLI, only then are image paths in a message read; to another model they are text."""
    return bool(client.get(f"/api/models/{model}").get("vision"))


def images_field(attached: Attached) -> dict[str, list[str]]:
    """A request's `images` (base64), left out when there are none; says which were added."""
    for path in attached.paths:
        sys.stderr.write(f"Added image '{path}'\n")
    return {"images": [base64.b64encode(image).decode() for image in attached.images]} if attached.images else {}


def one_shot(client: Client, model: str, prompt: str, options: dict[str, Any], think: Think = None) -> None:
    """Raises `UnreadableImage` before anything is sent when an image the prompt names cannot be read."""
    attached = attach(prompt) if mentions(prompt) and sees(client, model) else Attached(prompt, [], [])
    if think and cannot_think(client, model):
        sys.stderr.write(f"warning: model {model!r} does not think; --think changes nothing\n")
        think = None
    print_stream(client.stream("/api/generate", {"model": model, "prompt": attached.text, **images_field(attached),
                                                 "stream": True, "options": options, **think_field(think)}),
                 answer_writer())


class Repl:
    def __init__(self, client: Client, model: str, session: str | None, console: Console, think: Think = None) -> None:
        self.client = client
        self.model = model
        self.session = session or str(uuid.uuid4())
        self.options: dict[str, Any] = {}
        self.think = think
        """Sent as `think` with each message; None: the model's default."""
        self.console = console
        self.vision: bool | None = None
        """Whether the model takes images; asked of the daemon when a message first names one."""

    def sees(self) -> bool:
        if self.vision is None:
            self.vision = sees(self.client, self.model)
        return self.vision

    def read_message(self) -> str | None:
        """One message; `\"\"\"` opens a block that ends at a line ending with `\"\"\"`."""
        line = input(">>> ")
        if not line.lstrip().startswith('"""'):
            return line
        text = line.lstrip()[3:]
        if text.endswith('"""'):
            return text[:-3]
        parts = [text] if text else []
        while True:
            more = input("... ")
            if more.rstrip().endswith('"""'):
                parts.append(more.rstrip()[:-3])
                return "\n".join(parts)
            parts.append(more)

    def run(self) -> None:
        self.console.print(f"Chatting with [bold]{self.model}[/] (session {self.session}). Type /? for help.", highlight=False)
        while True:
            try:
                message = self.read_message()
            except EOFError:
                self.console.print()
                return
            except KeyboardInterrupt:
                self.console.print("\nUse Ctrl + d or /bye to exit.")
                continue
            if message is None or not message.strip():
                continue
            if message.startswith("/") and not (leads_with_image(message) and self.sees()):
                if self.command(message.strip()):
                    return
                continue
            self.send(message)

    def send(self, message: str) -> None:
        """One message and its answer. An image that cannot be read, or the daemon refusing the
        message (a 400 for a bad image), is said and the chat goes on; nothing was sent or stored."""
        try:
            attached = attach(message) if mentions(message) and self.sees() else Attached(message, [], [])
            user = {"role": "user", "content": attached.text, **images_field(attached)}
            print_stream(self.client.stream("/api/chat", {
                "model": self.model, "session_id": self.session, "stream": True, "options": self.options,
                "messages": [user], **think_field(self.think),
            }), answer_writer())
        except UnreadableImage as exc:
            sys.stderr.write(f"Error: {exc}; nothing was sent.\n")
        except DaemonError as exc:
            if exc.status is None:  # the daemon is gone: the chat ends
                raise
            sys.stderr.write(f"Error: {exc}\n")

    def command(self, line: str) -> bool:
        """Handle a slash command; True means exit."""
        words = line.split()
        head = words[0].lower()
        if head in ("/bye", "/exit"):
            return True
        if head in ("/?", "/help"):
            self.console.print(HELP + (f"\n{IMAGES_HELP}" if self.sees() else ""), highlight=False, markup=False)
        elif head == "/clear":
            self.session = str(uuid.uuid4())
            self.console.print("Cleared session context.")
        elif head == "/set" and len(words) >= 4 and words[1] == "parameter":
            self.set_parameter(words[2], " ".join(words[3:]))
        elif head == "/set" and words[1:2] in (["think"], ["nothink"]):
            self.set_think(words[1:])
        elif head == "/show" and words[1:] == ["info"]:
            info = self.client.get(f"/api/models/{self.model}")
            for key in ("name", "family", "quantization", "context_size", "template", "size_mb", "parameters"):
                self.console.print(f"  {key:<14}{info[key]}", highlight=False)
        else:
            self.console.print(f"Unknown command {line!r}. Type /? for help.", highlight=False)
        return False

    def set_parameter(self, name: str, value: str) -> None:
        """Checked here by the daemon's own `GenerationOptions`, so a bad value is refused when
        it is set, not on every message after; `stop` adds one more stop string."""
        if name not in PARAMETERS:
            self.console.print(f"Unknown parameter {name!r}; one of: {', '.join(PARAMETERS)}", highlight=False)
            return
        key = ALIASES.get(name, name)
        given: str | list[str] = [*self.options.get("stop", []), value] if key == "stop" else value
        try:
            typed = parameter_value(key, given)
        except InvalidOptions as exc:
            self.console.print(exc.message, highlight=False, markup=False)
            return
        self.options[key] = list(typed) if key == "stop" else typed
        self.console.print(f"Set parameter '{name}' to '{value}'", highlight=False)

    def set_think(self, words: list[str]) -> None:
        """`think` / `think LEVEL` / `nothink`, as Ollama's REPL has them, for the messages after."""
        if words == ["nothink"]:
            self.think = False
            self.console.print("Set 'nothink' mode.", highlight=False)
            return
        if words[1:] and (len(words) > 2 or words[1] not in LEVELS):
            self.console.print(f"Unknown thinking level {' '.join(words[1:])!r}; one of: {', '.join(LEVELS)}",
                               highlight=False)
            return
        if cannot_think(self.client, self.model):
            self.console.print(f"warning: model {self.model!r} does not think; its answers stay the same",
                               highlight=False)
            return
        self.think = words[1] if words[1:] else True
        self.console.print(f"Set 'think' mode{f' to {words[1]!r}' if words[1:] else ''}.", highlight=False)
