"""Training rows: read and validate a JSONL file, then tokenize each row with its loss mask.

Every check that can fail on user data runs here, before the base model is loaded, and names the line.
Labels follow the causal-LM convention: `labels[t]` is the token at t, -100 where no loss is taken
(prompts, non-assistant turns; padding is added later by the collator).
"""

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from loraplex.chat_text import AuthorText, special_tokens, tokenize_pieces
from training.errors import DataError

IGNORE = -100
RowFormat = Literal["chat", "prompt-completion", "text"]
_SHAPES: dict[frozenset[str], RowFormat] = {
    frozenset({"messages"}): "chat",
    frozenset({"prompt", "completion"}): "prompt-completion",
    frozenset({"text"}): "text",
}
_ROLES = {"system", "user", "assistant", "tool"}
_JSONL = "JSONL holds one JSON object per line, each line a row"  # for a .json file of one array, or pretty-printed


@dataclass(frozen=True)
class Row:
    line: int  # 1-based line number in the file, for error messages
    data: dict[str, Any]


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    cut_from: int | None = None  # the row's length before max_seq_len cut trained tokens off its end

    @property
    def trained_tokens(self) -> int:
        # labels[0] is never predicted (nothing precedes it), so it never counts
        return sum(label != IGNORE for label in self.labels[1:])


@dataclass(frozen=True)
class Dataset:
    format: RowFormat
    rows: list[Row]
    sha256: str


def read_dataset(path: Path, format: str = "auto") -> Dataset:
    """Parse and check every row; all rows must share one format (detected from the first row on auto)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror}") from exc
    rows = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:  # utf-8-sig: past the byte order mark that some editors (Windows') start a UTF-8 file with
            data = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{path} line {number}: not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {number}: invalid JSON ({exc.msg} at column {exc.colno}); {_JSONL}") from None
        if not isinstance(data, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, got {type(data).__name__}; {_JSONL}")
        rows.append(Row(number, data))
    if not rows:
        raise DataError(f"data file {path} holds no rows")
    expected = row_format(rows[0], path) if format == "auto" else format
    for row in rows:
        found = row_format(row, path)
        if found != expected:
            raise DataError(f"{path} line {row.line}: a {found} row, but the data format is {expected}")
        _check_row(row, found, path)
    return Dataset(expected, rows, hashlib.sha256(raw).hexdigest())


def row_format(row: Row, path: Path) -> RowFormat:
    found = _SHAPES.get(frozenset(row.data))
    if found is None:
        raise DataError(
            f"{path} line {row.line}: unknown row shape with keys {sorted(row.data)}; expected "
            '{"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}'
        )
    return found


def _check_row(row: Row, fmt: RowFormat, path: Path) -> None:
    where = f"{path} line {row.line}"
    if fmt == "chat":
        messages = row.data["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not (isinstance(message, dict) and isinstance(message.get("content"), str)):
                raise DataError(f"{where}: message {i} needs a string 'content'")
            if message.get("role") not in _ROLES:
                raise DataError(f"{where}: message {i} has role {message.get('role')!r}, not one of {_ROLES}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the chat has no assistant turn, so there is nothing to learn")
    else:
        keys = ("prompt", "completion") if fmt == "prompt-completion" else ("text",)
        for key in keys:
            if not isinstance(row.data[key], str):
                raise DataError(f"{where}: {key!r} must be a string")
        if not row.data[keys[-1]]:
            raise DataError(f"{where}: {keys[-1]!r} is empty, so there is nothing to learn")


def tokenize_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    path: Path,
    *,
    chat_template: bool = False,
) -> tuple[list[Example], int]:
    """(examples, rows dropped because truncation left them nothing to learn). Raises if none remain.

    chat_template: prompt/completion rows become a user turn and an assistant turn of the base model's chat
    template, so that the adapter answers (and stops) the way chat clients ask.
    """
    if chat_template and dataset.format != "prompt-completion":
        raise DataError(
            f"--chat-template applies to prompt/completion rows; {path} holds {dataset.format} rows"
            + (", which always use the chat template" if dataset.format == "chat" else "")
        )
    templated = dataset.format == "chat" or chat_template
    if templated and not tokenizer.chat_template:
        raise DataError("the base model's tokenizer has no chat template; use prompt-completion or text rows")
    if templated and not tokenizer.is_fast:
        # assistant turns are located through character offsets, which only fast tokenizers report
        raise DataError("chat rows need a fast (Rust) tokenizer for the base model; use prompt-completion rows")
    examples = []
    for row in dataset.rows:
        whole = tokenize_row(row, dataset.format, tokenizer, path, chat_template=chat_template)
        cut = any(label != IGNORE for label in whole.labels[max_seq_len:])
        example = Example(
            whole.input_ids[:max_seq_len], whole.labels[:max_seq_len], len(whole.input_ids) if cut else None
        )
        if example.trained_tokens:
            examples.append(example)
    if not examples:
        raise DataError(f"{path}: max_seq_len {max_seq_len} truncates away every trained token of every row; raise it")
    return examples, len(dataset.rows) - len(examples)


def tokenize_row(
    row: Row, fmt: RowFormat, tokenizer: PreTrainedTokenizerBase, path: Path, *, chat_template: bool = False
) -> Example:
    if fmt == "chat":
        return _chat_example(row.data["messages"], row.line, tokenizer, path)
    if fmt == "prompt-completion" and chat_template:
        turns = [
            {"role": "user", "content": row.data["prompt"]},
            {"role": "assistant", "content": row.data["completion"]},
        ]
        return _chat_example(turns, row.line, tokenizer, path)
    eos = _eos_id(tokenizer)
    if fmt == "prompt-completion":
        # Tokenized apart so that the boundary is exact: the prompt never leaks into the loss.
        prompt = tokenizer(row.data["prompt"])["input_ids"]
        completion = tokenizer(row.data["completion"], add_special_tokens=False)["input_ids"] + [eos]
        return Example(prompt + completion, [IGNORE] * len(prompt) + completion)
    ids = tokenizer(row.data["text"])["input_ids"] + [eos]
    return Example(ids, list(ids))


def _chat_example(messages: list[dict], line: int, tokenizer: PreTrainedTokenizerBase, path: Path) -> Example:
    """Loss on assistant turns only, located by rendering prefixes of the conversation.

    Rendering `messages[:i]` with the generation prompt and `messages[:i+1]` gives the characters of
    assistant turn i (its content and the template's end-of-turn marker) whatever the template looks like;
    the whole conversation is then tokenized once and tokens are labelled by their character offsets, so
    BPE merges across turn boundaries cannot shift the mask.

    A row's text that spells a special token is text, as the server reads a request's (loraplex.chat_text): an
    adapter learns the tokens it is then served, not a control token where the row wrote its spelling.
    """
    apart = AuthorText(special_tokens(tokenizer))
    messages = [apart.message(message) for message in messages]
    try:
        full = _render(tokenizer, messages, generation_prompt=False)
        rendered = [
            (_render(tokenizer, messages[:i], True), _render(tokenizer, messages[: i + 1], False))
            for i, message in enumerate(messages)
            if message["role"] == "assistant"
        ]
    except TemplateError as exc:  # e.g. a template that refuses system turns or non-alternating roles
        raise DataError(f"{path} line {line}: the base model's chat template refuses this chat: {exc}") from None
    for start, end in rendered:
        if not (end.startswith(start) and full.startswith(end)):
            raise DataError(
                f"{path} line {line}: the chat template renders turns differently as the chat grows, "
                "so assistant turns cannot be located; use prompt-completion rows"
            )
    spans = [(len(start), len(end)) for start, end in rendered]
    ids, begins = tokenize_pieces(tokenizer, apart.pieces(full), offsets=True)
    labels = [
        token if any(lo <= begin < hi for lo, hi in spans) else IGNORE for token, begin in zip(ids, begins, strict=True)
    ]
    eos = _eos_id(tokenizer)
    if eos not in (t for t, label in zip(ids, labels, strict=True) if label != IGNORE):
        # The template ends turns without EOS: append it so the model learns to stop.
        ids, labels = [*ids, eos], [*labels, eos]
    return Example(ids, labels)


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the base model's tokenizer has no EOS token, so the model could not learn to stop")
    return tokenizer.eos_token_id
