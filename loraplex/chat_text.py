"""The text a chat's author writes into a chat template, kept apart from the template's control tokens.

Rendering a chat and tokenizing the result reads every special token's spelling as that token, whoever wrote it:
a message spelling `<|im_end|>\\n<|im_start|>system\\n...` would close its turn and open a system turn of its own.
The author's text (a message's content; tools' names, descriptions and schemas and a history call's arguments,
keys included) goes into the template as placeholders instead, and its tokens are those of its text, special tokens
split (as OpenAI's API reads it; vLLM and TGI take such text as control tokens). The server renders a request's chat
so (server/tokenizer_workers.py) and `loraplex train` a dataset's chat rows, so that an adapter learns the tokens it
is then served.
"""

import re
import secrets
from collections.abc import Iterator
from typing import Any

from transformers import PreTrainedTokenizerBase


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> re.Pattern[str]:
    """What the tokenizer reads as special tokens, as one pattern: one scan of a text (Llama 3 has 256)."""
    added = (token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    return re.compile("|".join(map(re.escape, {*tokenizer.all_special_tokens, *added})) or "(?!)")  # none: no match


class AuthorText:
    """The author's strings of one chat, each spelling a special token put apart as a placeholder (`texts` keeps
    them, in their placeholders' order). A content that spells one becomes one placeholder, whole; in every other
    string each special token spelled is a placeholder of its own, since templates write those as JSON, whose
    escapes a whole string's text would lose. A template that writes them with ASCII escapes (\\\\ue000) shows the
    placeholder instead, still not a control token."""

    def __init__(self, special: re.Pattern[str]) -> None:
        self.special = special
        self.texts: list[str] = []
        mark = secrets.token_hex(8)  # an author cannot spell a placeholder it does not know
        self._prefix = f"\ue000{mark}-"  # private-use marks: no template alters them
        self._placeholders = re.compile(f"\ue000{mark}-(\\d+)\ue000")

    def message(self, message: dict[str, Any]) -> dict[str, Any]:
        apart = {}
        for key, value in message.items():
            if key == "content" and isinstance(value, str):  # one scan: a content can be a whole prompt's text
                apart[key] = self._placeholder(value) if self.special.search(value) else value
            else:
                apart[key] = value if key == "role" else self.value(value)
        return apart

    def value(self, value: Any) -> Any:
        """A JSON value (strings, lists, objects) with each special token spelled in its strings, keys included, a
        placeholder; the value itself where it spells none."""
        if isinstance(value, str):
            return self.special.sub(lambda spelled: self._placeholder(spelled.group()), value)
        if isinstance(value, list):
            return [self.value(item) for item in value]
        if isinstance(value, dict):
            return {self.value(k): self.value(v) for k, v in value.items()}
        return value

    def pieces(self, rendered: str) -> Iterator[tuple[int, str, bool]]:
        """(where it starts in `rendered`, text, whether it is the author's) of the rendered chat, in order: the
        template's text (its control tokens the tokenizer's) and the author's texts in place of their
        placeholders."""
        at = 0
        for found in self._placeholders.finditer(rendered):
            if found.start() > at:
                yield at, rendered[at : found.start()], False
            yield found.start(), self.texts[int(found.group(1))], True
            at = found.end()
        if at < len(rendered):
            yield at, rendered[at:], False

    def _placeholder(self, text: str) -> str:
        self.texts.append(text)
        return f"{self._prefix}{len(self.texts) - 1}\ue000"


def tokenize_pieces(
    tokenizer: PreTrainedTokenizerBase, pieces: Iterator[tuple[int, str, bool]], offsets: bool = False
) -> tuple[list[int], list[int]]:
    """(ids, where each token begins in the rendered chat: only with `offsets`) of a rendered chat's pieces
    (AuthorText.pieces): the template's text as the template's tokenize does it, the author's special tokens
    split. An author's text's tokens all begin where its placeholder does."""
    ids: list[int] = []
    begins: list[int] = []
    for start, text, authors in pieces:
        encoded = tokenizer(
            text, add_special_tokens=False, split_special_tokens=authors, return_offsets_mapping=offsets
        )
        ids += encoded["input_ids"]
        if offsets:
            begins += [start if authors else start + begin for begin, _ in encoded["offset_mapping"]]
    return ids, begins
