"""Incremental detokenization with stop sequences: text deltas that never show a stop sequence."""

from collections.abc import Callable
from functools import partial

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

Decode = Callable[[list[int]], str]

# Tokens past the read offset that may wait for their text: a UTF-8 character spans at most 4 bytes, so more make a
# run of undecodable bytes or of special tokens, which settles (_settle) so that the window stays short
MAX_PENDING = 8


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
    ends in an incomplete UTF-8 sequence (U+FFFD). A stop sequence counts only where it ends past the text of the
    first `min_tokens` tokens (vLLM's min_tokens: the answer is at least that long); `include_stop` (vLLM's
    include_stop_str_in_output) keeps the stop sequence that ends the text. Only the text that a later token's
    search or delta reads is kept, so a token costs O(longest stop sequence + its text) however long the answer.
    """

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...], min_tokens: int = 0, include_stop: bool = False
    ) -> None:
        self._decode = window_decoder(tokenizer)
        self._stop = tuple(s for s in stop if s)
        self._include_stop = include_stop
        # characters of earlier text that a stop sequence ending in new text may begin in
        self._overlap = max((len(s) for s in self._stop), default=1) - 1
        # text that may begin a stop sequence waits, unless a stop stays in the text: then all text before it does
        self._holdback = 0 if include_stop else self._overlap
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        # the decoded text from the first character a push may read again (with stop sequences only: without,
        # nothing is held back)
        self._text = ""
        self._emitted = 0  # characters of _text already returned
        self._min_tokens = min_tokens

    def _decode_new(self) -> str:
        prefix = self._decode(self._ids[self._prefix : self._read])
        full = self._decode(self._ids[self._prefix :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return full[len(prefix) :]
        if len(self._ids) - self._read > MAX_PENDING:
            return self._settle(prefix, full)
        return ""

    def _settle(self, prefix: str, full: str) -> str:
        """The text of the tokens waiting past the read offset up to the last cut whose text is final. Without this,
        a run of tokens that add no text (undecodable bytes, special tokens; a client may force them by logit_bias)
        would have every token decode the whole run, twice: quadratic work on the engine thread. Only the last
        character of `full` may still change (an incomplete one is a single U+FFFD at its end); every byte before it
        shows as the decode of the whole output shows it. A cut within a character spread over tokens without text
        has no final text: the first waiting token goes alone then, which still keeps the window short."""
        final = full[:-1] if full.endswith("\ufffd") else full
        for cut in range(len(self._ids) - 1, self._read, -1):
            text = self._decode(self._ids[self._prefix : cut])
            if final.startswith(text):
                break
        self._prefix, self._read = self._read, cut
        return text[len(prefix) :]

    def push(self, token_id: int) -> tuple[str, str | None]:
        """(text delta, the stop sequence hit or None). After a hit the delta ends before the stop text (with
        include_stop: with it; the first one given where two begin at the same character)."""
        self._ids.append(token_id)
        if not self._stop:  # every character goes out at once: no text to keep
            return self._decode_new(), None
        self._forget_read()
        searched = len(self._text)  # a stop ending by here was looked for at an earlier token, or did not count
        self._text += self._decode_new()
        # The first min_tokens tokens' text ends nothing (their stops were not looked for, and the next token looks
        # only past their text); a stop may straddle earlier text: each is looked for where it would end past it.
        stops = self._stop if len(self._ids) > self._min_tokens else ()
        found = ((self._text.find(s, max(0, searched - len(s) + 1)), s) for s in stops)
        hits = [(start, stop) for start, stop in found if start >= 0]
        if hits:
            start, stop = min(hits, key=lambda hit: hit[0])
            end = start + len(stop) if self._include_stop else start
            delta = self._text[self._emitted : end]
            self._emitted = max(self._emitted, end)
            return delta, stop
        end = len(self._text) - self._holdback
        if end <= self._emitted:
            return "", None
        delta, self._emitted = self._text[self._emitted : end], end
        return delta, None

    def _forget_read(self) -> None:
        """Drop the text no push reads again: deltas begin at _emitted, and the next search at most _overlap
        characters before the end of the text so far. Kept whole, the text was copied by every token: quadratic in
        the answer's length, on the engine thread that runs every request's host work between steps."""
        cut = min(self._emitted, len(self._text) - self._overlap)
        if cut > 0:
            self._text = self._text[cut:]
            self._emitted -= cut

    def flush(self) -> str:
        """The held-back tail, when the request ends for another reason than a stop sequence."""
        delta, self._emitted = self._text[self._emitted :], len(self._text)
        return delta
