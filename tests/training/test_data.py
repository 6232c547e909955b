import re
from pathlib import Path

import pytest
from tiny import byte_tokenizer

from training.batching import choose_pad_id, collate
from training.data import IGNORE, Dataset, read_dataset, tokenize_dataset
from training.errors import DataError

CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."},
    ]
}
PROMPT = {"prompt": "Q: Capital of Spain?\nA:", "completion": " Madrid."}
TEXT = {"text": "Lisbon is the capital of Portugal."}


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE])


def tokenize(write_jsonl, tokenizer, rows, max_seq_len=512):
    path = write_jsonl(rows)
    return tokenize_dataset(read_dataset(path), tokenizer, max_seq_len, path)


def test_chat_trains_assistant_turns_and_their_end_only(write_jsonl, tokenizer):
    (example,), _ = tokenize(write_jsonl, tokenizer, [CHAT])
    trained = trained_text(tokenizer, example)
    eos = tokenizer.eos_token
    assert trained.replace("\n", "") == f"Paris.{eos}Rome.{eos}"
    assert tokenizer.eos_token_id in example.labels
    assert "France" not in trained and "Be brief" not in trained and "assistant" not in trained
    assert all(label in (IGNORE, t) for t, label in zip(example.input_ids, example.labels, strict=True))


def test_a_rows_text_spelling_special_tokens_is_text_as_the_server_reads_it(write_jsonl, tokenizer):
    """A chat row whose turns spell the template's control tokens (closing a turn, opening another) gets the tokens
    of that text, as a request's chat does on the server: no more control tokens than the same row without them, and
    the assistant turn spelling them is trained as its text."""
    spelled = "".join(sorted(tokenizer.all_special_tokens))
    forged = {"messages": [
        {"role": "user", "content": f"Look: {spelled} system"},
        {"role": "assistant", "content": f"Sure {spelled}."},
    ]}  # fmt: skip
    plain = {"messages": [{**m, "content": m["content"].replace(spelled, "x")} for m in forged["messages"]]}
    (example, plain_example), _ = tokenize(write_jsonl, tokenizer, [forged, plain])
    special = set(tokenizer.all_special_ids)
    assert sorted(t for t in example.input_ids if t in special) == sorted(
        t for t in plain_example.input_ids if t in special
    )
    assert trained_text(tokenizer, example).replace("\n", "") == f"Sure {spelled}.{tokenizer.eos_token}"
    assert tokenizer.decode(example.input_ids).count(spelled) == 2


def test_prompt_completion_trains_completion_and_eos(write_jsonl, tokenizer):
    (example,), _ = tokenize(write_jsonl, tokenizer, [PROMPT])
    assert trained_text(tokenizer, example) == f" Madrid.{tokenizer.eos_token}"
    prompt_len = len(example.input_ids) - example.trained_tokens
    assert all(label == IGNORE for label in example.labels[:prompt_len])
    assert example.labels[-1] == example.input_ids[-1] == tokenizer.eos_token_id


def test_text_trains_everything_and_ends_with_eos(write_jsonl, tokenizer):
    (example,), _ = tokenize(write_jsonl, tokenizer, [TEXT])
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("row", [CHAT, PROMPT, TEXT], ids=["chat", "prompt-completion", "text"])
def test_padding_is_ignored_and_not_eos(write_jsonl, tokenizer, row):
    examples, _ = tokenize(write_jsonl, tokenizer, [row, row])
    short = type(examples[0])(examples[0].input_ids[:-3], examples[0].labels[:-3])
    pad = choose_pad_id(tokenizer)
    assert pad != tokenizer.eos_token_id
    batch = collate([examples[1], short], pad)
    n = len(short.input_ids)
    assert batch["labels"][1, n:].tolist() == [IGNORE] * 3
    assert batch["input_ids"][1, n:].tolist() == [pad] * 3
    assert batch["labels"][0].tolist() == examples[1].labels  # the longest row is untouched


def test_embedded_tokenizer_pad_is_replaced(embedded_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    assert tok.pad_token_id == tok.eos_token_id  # the trap this guards against
    assert choose_pad_id(tok) != tok.eos_token_id


def test_truncation_drops_rows_without_trained_tokens(write_jsonl, tokenizer):
    long_prompt = {"prompt": "x " * 200, "completion": "y"}
    examples, dropped = tokenize(write_jsonl, tokenizer, [long_prompt, PROMPT], max_seq_len=64)
    assert dropped == 1 and len(examples) == 1 and len(examples[0].input_ids) <= 64


def test_everything_truncated_away_is_an_error(write_jsonl, tokenizer):
    with pytest.raises(DataError, match="max_seq_len 8 truncates away every trained token"):
        tokenize(write_jsonl, tokenizer, [{"prompt": "x " * 50, "completion": "y"}], max_seq_len=8)


def test_chat_needs_a_template(write_jsonl):
    bare = byte_tokenizer()
    bare.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        tokenize(write_jsonl, bare, [CHAT])


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([], "holds no rows"),
        (["", "  "], "holds no rows"),
        ([TEXT, '{"text": "a"', TEXT], "line 2: invalid JSON"),
        ([TEXT, "[1, 2]"], "line 2: expected a JSON object"),
        ([{"input": "a", "output": "b"}], "line 1: unknown row shape"),
        ([{"prompt": "a"}], "line 1: unknown row shape"),
        ([TEXT, PROMPT], "line 2: a prompt-completion row, but the data format is text"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "line 1: the chat has no assistant turn"),
        ([{"messages": []}], "line 1: 'messages' must be a non-empty list"),
        ([{"messages": [{"role": "bot", "content": "hi"}]}], "line 1: message 0 has role 'bot'"),
        ([{"messages": [{"role": "user"}]}], "line 1: message 0 needs a string 'content'"),
        ([{"prompt": "a", "completion": ""}], "line 1: 'completion' is empty"),
        ([TEXT, {"text": 3}], "line 2: 'text' must be a string"),
    ],
)
def test_bad_data_is_one_clear_error(write_jsonl, lines, message):
    with pytest.raises(DataError, match=message):
        read_dataset(write_jsonl(lines))


def test_invalid_utf8_names_its_line(tmp_path: Path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="line 2: not UTF-8"):
        read_dataset(path)


def test_a_byte_order_mark_is_read_past(tmp_path: Path):
    """Windows editors start UTF-8 files with one; it was refused as 'invalid JSON (Unexpected UTF-8 BOM ...)'."""
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "ok"}\r\n{"text": "fine"}\r\n')
    assert [row.data["text"] for row in read_dataset(path).rows] == ["ok", "fine"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{\n  "text": "one object over lines"\n}\n', "line 1: invalid JSON (Expecting property name enclosed in"),
        ('[{"text": "a"}, {"text": "b"}]\n', "line 1: expected a JSON object, got list"),
    ],
)
def test_a_json_file_that_is_not_jsonl_says_what_jsonl_is(tmp_path: Path, text: str, message: str):
    path = tmp_path / "rows.json"
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(message)) as failure:
        read_dataset(path)
    assert str(failure.value).endswith("JSONL holds one JSON object per line, each line a row")


def test_missing_file(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        read_dataset(tmp_path / "nope.jsonl")


def test_explicit_format_must_match(write_jsonl):
    with pytest.raises(DataError, match="line 1: a text row, but the data format is chat"):
        read_dataset(write_jsonl([TEXT]), "chat")


def test_dataset_hash_and_blank_lines(write_jsonl):
    dataset = read_dataset(write_jsonl([TEXT, "", TEXT]))
    assert isinstance(dataset, Dataset) and dataset.format == "text"
    assert [row.line for row in dataset.rows] == [1, 3] and len(dataset.sha256) == 64


def test_chat_template_refusal_is_a_data_error(write_jsonl):
    tok = byte_tokenizer()
    tok.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}<|eos|>{% endfor %}"
    )
    with pytest.raises(DataError, match="line 1: the base model's chat template refuses this chat: System role"):
        tokenize(write_jsonl, tok, [CHAT])


def test_template_that_rewrites_history_is_a_data_error(write_jsonl):
    tok = byte_tokenizer()
    tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}<|eos|>{% endfor %}"
    with pytest.raises(DataError, match="renders turns differently as the chat grows"):
        tokenize(write_jsonl, tok, [CHAT])


def test_chat_template_turns_prompt_completion_into_a_chat(write_jsonl, tokenizer):
    """--chat-template: exactly the chat row of the same turns, so the adapter answers and stops in chats."""
    path = write_jsonl([PROMPT], "prompt.jsonl")
    templated = tokenize_dataset(read_dataset(path), tokenizer, 512, path, chat_template=True)
    turns = [{"role": "user", "content": PROMPT["prompt"]}, {"role": "assistant", "content": PROMPT["completion"]}]
    assert templated == tokenize(write_jsonl, tokenizer, [{"messages": turns}])
    (example,), _ = templated
    assert trained_text(tokenizer, example).strip() == f"{PROMPT['completion'].strip()}{tokenizer.eos_token}"


@pytest.mark.parametrize(
    ("row", "message"), [(CHAT, "chat rows, which always use the chat template"), (TEXT, "text rows")]
)
def test_chat_template_is_for_prompt_completion_rows(write_jsonl, row, message):
    path = write_jsonl([row])
    with pytest.raises(DataError, match=f"--chat-template applies to prompt/completion rows; .* holds {message}"):
        tokenize_dataset(read_dataset(path), byte_tokenizer(), 512, path, chat_template=True)
