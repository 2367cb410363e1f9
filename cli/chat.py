"""`myllm run`: one answer for a prompt, or an interactive chat kept in a daemon session."""

from __future__ import annotations

import sys
import uuid
from typing import Any

from rich.console import Console

from cli.client import Client
from myllm.errors import InvalidOptions
from myllm.runtime.request.options import ALIASES, PARAMETERS, parameter_value

HELP = f"""Available commands:
  /set parameter NAME VALUE   set an option ({', '.join(PARAMETERS)})
  /show info                  show the model's details
  /clear                      start a new session (forget the conversation)
  /bye                        exit
  /?                          this help

Use \"\"\" to begin and end a multi-line message. Ctrl-C stops an answer; Ctrl-D or /bye exits."""


def print_stream(events: Any, out: Any = sys.stdout) -> dict[str, Any] | None:
    """Write token events as they come; returns the final event. Ctrl-C stops the answer
    (closing the stream cancels it in the daemon) and returns None."""
    try:
        for event in events:
            if "error" in event:
                out.write(f"\nError: {event['error']}\n")
                return None
            if event.get("done"):
                out.write("\n")
                out.flush()
                return event
            out.write(event["token"])
            out.flush()
    except KeyboardInterrupt:
        events.close()
        out.write("\n")
    return None


def one_shot(client: Client, model: str, prompt: str, options: dict[str, Any]) -> None:
    print_stream(client.stream("/api/generate", {"model": model, "prompt": prompt, "stream": True, "options": options}))


class Repl:
    def __init__(self, client: Client, model: str, session: str | None, console: Console) -> None:
        self.client = client
        self.model = model
        self.session = session or str(uuid.uuid4())
        self.options: dict[str, Any] = {}
        self.console = console

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
            if message.startswith("/"):
                if self.command(message.strip()):
                    return
                continue
            print_stream(self.client.stream("/api/chat", {
                "model": self.model, "session_id": self.session, "stream": True, "options": self.options,
                "messages": [{"role": "user", "content": message}],
            }))

    def command(self, line: str) -> bool:
        """Handle a slash command; True means exit."""
        words = line.split()
        head = words[0].lower()
        if head in ("/bye", "/exit"):
            return True
        if head in ("/?", "/help"):
            self.console.print(HELP, highlight=False, markup=False)
        elif head == "/clear":
            self.session = str(uuid.uuid4())
            self.console.print("Cleared session context.")
        elif head == "/set" and len(words) >= 4 and words[1] == "parameter":
            self.set_parameter(words[2], " ".join(words[3:]))
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
