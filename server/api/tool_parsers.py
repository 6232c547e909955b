"""tool_choice "auto": the model answers freely, and a parser of its own call format (--tool-call-parser) tells its
calls from its text, as vLLM's --enable-auto-tool-choice --tool-call-parser does.

A parser reads one choice's answer as it arrives: feed() takes each new piece of text and returns the parts it
has settled (text, or a whole call), finish() the rest once the answer has ended. The same parser reads a whole
answer (read_answer: one feed, then finish), so that a stream's deltas add up to what the answer would have held,
wherever the text was cut into tokens.

A format is one class: TaggedCalls covers formats that wrap each call in a start and an end marker (Hermes's
`<tool_call>...</tool_call>`); a subclass gives the markers and reads what is between them. TOOL_CALL_PARSERS
names them for the setting."""

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

from server.api.schemas import ChatDelta
from server.api.tools import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall, call_id


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text


Part = str | ParsedCall  # text of the answer's content, or a call


class ToolCallParser(ABC):
    """Reads one choice's answer, as it arrives, into its content and its calls: calls of the request's tools
    (`names`) alone. A call of any other function stays text, as a call the parser cannot read does: the client
    has no such function to run (and OpenAI's finish reason "tool_calls" would ask it to)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)

    @abstractmethod
    def feed(self, text: str) -> list[Part]:
        """The parts settled by `text` (the answer's next piece), in the answer's order."""

    @abstractmethod
    def finish(self) -> list[Part]:
        """The parts still held once the answer has ended."""


class TaggedCalls(ToolCallParser):
    """Calls each wrapped in START ... END, anywhere in the answer. What is between the markers and reads as a
    call (read_call) of one of the tools is a call; what does not, markers included, stays text where it was, as
    vLLM answers a call it cannot read. The whitespace after a call (the format's line breaks between calls) is
    not content. A START not closed when the answer ends is read up to the end (a model may stop at its
    end-of-turn token instead).

    Held back, and so bounded by the answer's length (max_tokens, itself within --max-seq-len): the text that
    may be the beginning of START (shorter than START), and a call until its END (or the answer's end)."""

    START: ClassVar[str]
    END: ClassVar[str]

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__(names)
        self._held = ""  # outside a call: the text that may begin START
        self._call: list[str] | None = None  # inside a call: its text so far, in pieces (START excluded)
        self._tail = ""  # inside a call: its last characters, where END may have begun
        self._after_call = False  # the whitespace that follows a call is skipped

    @abstractmethod
    def read_call(self, inner: str) -> ParsedCall | None:
        """The call that `inner` (the text between the markers) writes, None where it writes none."""

    def feed(self, text: str) -> list[Part]:
        parts: list[Part] = []
        while text:
            if self._call is not None:  # a call's text is kept in pieces: no copy of it per piece
                window = self._tail + text
                end = window.find(self.END)
                if end < 0:
                    self._call.append(text)
                    self._tail = window[max(0, len(window) - len(self.END) + 1) :]
                    break
                so_far = "".join(self._call)
                inner = so_far[: len(so_far) - len(self._tail)] + window[:end]
                text = window[end + len(self.END) :]
                self._close(inner, self.END, parts)
                continue
            if self._after_call:
                text = text.lstrip()
                self._after_call = not text
                continue
            held = self._held + text  # at most len(START) - 1 characters held, and the new text
            start = held.find(self.START)
            if start >= 0:
                _text(parts, held[:start])
                self._held, self._call, self._tail = "", [], ""
                text = held[start + len(self.START) :]
                continue
            keep = _prefix_at_end(held, self.START)
            _text(parts, held[: len(held) - keep])
            self._held = held[len(held) - keep :]
            break
        return parts

    def finish(self) -> list[Part]:
        parts: list[Part] = []
        if self._call is not None:
            self._close("".join(self._call), "", parts)
        _text(parts, self._held)
        self._held, self._after_call = "", False
        return parts

    def _close(self, inner: str, end: str, parts: list[Part]) -> None:
        call = self.read_call(inner)
        if call is None or call.name not in self.names:
            _text(parts, self.START + inner + end)
        else:
            parts.append(call)
            self._after_call = True
        self._call, self._tail = None, ""


class Hermes(TaggedCalls):
    """Hermes 2 Pro's format, which Qwen2.5 and many fine-tunes use: `<tool_call>\\n{"name": ..., "arguments":
    {...}}\\n</tool_call>`, one block a call. A block whose JSON is not an object with a name (a string) and
    arguments (an object; left out: none) stays text."""

    START = "<tool_call>"
    END = "</tool_call>"

    def read_call(self, inner: str) -> ParsedCall | None:
        try:
            call = json.loads(inner)
        except (ValueError, RecursionError):  # RecursionError: brackets nested past the interpreter's limit
            return None
        if not isinstance(call, dict):
            return None
        name, arguments = call.get("name"), call.get("arguments", {})
        if not isinstance(name, str) or not _encodable(name) or not isinstance(arguments, dict):
            return None
        try:  # NaN, Infinity and numbers past a float's range are no JSON a client can read
            text = json.dumps(arguments, ensure_ascii=False, allow_nan=False)
        except (ValueError, RecursionError):
            return None
        # a lone surrogate ("\\ud800" in the model's JSON) stays escaped: the answer's UTF-8 cannot hold it
        return ParsedCall(name, text if _encodable(text) else json.dumps(arguments))


TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {"hermes": Hermes}


def _text(parts: list[Part], text: str) -> None:
    if text:
        parts.append(text)


def _encodable(text: str) -> bool:
    """A non-empty text that UTF-8 can hold (not one with a lone surrogate)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return bool(text)


def _prefix_at_end(text: str, marker: str) -> int:
    """The length of the longest end of `text` that begins `marker` (shorter than it)."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


# ---- the parts as OpenAI answers them ----------------------------------------------------------------------


def read_answer(parser: ToolCallParser, text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole answer's content and calls. The content is null where the answer is calls alone, as OpenAI's."""
    content: list[str] = []
    calls: list[ToolCall] = []
    for part in [*parser.feed(text), *parser.finish()]:
        if isinstance(part, str):
            content.append(part)
        else:
            calls.append(ToolCall(id=call_id(), function=FunctionCall(name=part.name, arguments=part.arguments)))
    joined = "".join(content)
    return (joined or None) if calls else joined, calls


class StreamedCalls:
    """One streamed choice's parts as OpenAI streams them, each delta a chunk's: text as content, and each call as
    two deltas, the first holding its index, id, type, name and arguments "", the second its whole arguments (a
    call is known to be one only once it is complete). A chunk holds one call delta at most: clients that read
    `delta.tool_calls[0]` alone lose none."""

    def __init__(self, parser: ToolCallParser) -> None:
        self._parser = parser
        self.calls = 0

    def deltas(self, text: str, ended: bool) -> list[ChatDelta]:
        """The deltas that `text` settles (all that is left, where the answer has `ended`), in the answer's order."""
        parts = self._parser.feed(text)
        if ended:
            parts += self._parser.finish()
        out: list[ChatDelta] = []
        for part in parts:
            if isinstance(part, str):
                if out and out[-1].content is not None:
                    out[-1].content += part
                else:
                    out.append(ChatDelta(content=part))
                continue
            head = DeltaFunctionCall(name=part.name, arguments="")
            out.append(
                ChatDelta(tool_calls=[DeltaToolCall(index=self.calls, id=call_id(), type="function", function=head)])
            )
            out.append(
                ChatDelta(
                    tool_calls=[DeltaToolCall(index=self.calls, function=DeltaFunctionCall(arguments=part.arguments))]
                )
            )
            self.calls += 1
        return out
