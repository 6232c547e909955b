"""Incremental detokenization with stop sequences: text deltas that never show a stop sequence."""

from collections.abc import Callable
from functools import partial

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

Decode = Callable[[list[int]], str]


def window_decoder(tokenizer: PreTrainedTokenizerBase) -> Decode:
    """`tokenizer.decode(ids, skip_special_tokens=True)` as one function: the Rust tokenizer's own decode when that
    is all the call would run (a fast tokenizer that overrides nothing and cleans up no spaces), since the
    wrapper's argument handling costs twice the decode itself and a stream decodes twice per token of every row."""
    cls = type(tokenizer)
    if (
        isinstance(tokenizer, PreTrainedTokenizerFast)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is PreTrainedTokenizerFast._decode
        and not tokenizer.clean_up_tokenization_spaces
    ):
        return partial(tokenizer.backend_tokenizer.decode, skip_special_tokens=True)
    return partial(tokenizer.decode, skip_special_tokens=True)


class TextStream:
    """Feed token ids one by one; get the text they add, holding back what may start a stop sequence.

    Decodes a short window (TGI's prefix/read offsets) so each token costs O(1), and waits while the text
    ends in an incomplete UTF-8 sequence (U+FFFD).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self._decode = window_decoder(tokenizer)
        self._stop = tuple(s for s in stop if s)
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._text = ""  # all decoded text so far (with stop sequences only: without, nothing is held back)
        self._emitted = 0  # characters of _text already returned

    def _decode_new(self) -> str:
        prefix = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(prefix) :]

    def push(self, token_id: int) -> tuple[str, bool]:
        """(text delta, whether a stop sequence was hit). After a hit the delta ends before the stop text."""
        self._ids.append(token_id)
        if not self._stop:  # every character goes out at once: no text to keep
            return self._decode_new(), False
        self._text += self._decode_new()
        # A stop may straddle earlier text: search from where the longest stop could begin.
        start = max(0, self._emitted - self._holdback)
        hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            end = min(hits)
            delta = self._text[self._emitted : end]
            self._emitted = max(self._emitted, end)
            return delta, True
        end = len(self._text) - self._holdback
        if end <= self._emitted:
            return "", False
        delta, self._emitted = self._text[self._emitted : end], end
        return delta, False

    def flush(self) -> str:
        """The held-back tail, when the request ends for another reason than a stop sequence."""
        delta, self._emitted = self._text[self._emitted :], len(self._text)
        return delta
