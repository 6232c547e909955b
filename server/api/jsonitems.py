"""A JSON body's items counted before it is parsed, at the speed of a byte search.

json.loads and pydantic-core are C and Rust code that keep the interpreter lock for as long as they run: parsing a
body of a million tiny items (4 MiB of `[3],`) takes ~0.3 s, during which the engine thread, which takes the lock
between any two of its launches, waits, and with it every client's stream. What they spend follows the body's
items, not its bytes (4 MiB of prompt text parses in ~3 ms), so a body of the inference routes is refused, unparsed,
past the items the largest honest request holds.

Items are the commas and the opening brackets outside strings: each array or object opens with a bracket, and each
of its values but the first follows a comma, so a body parses to at most three objects an item (a key, its value,
and a container's first value). Commas and brackets inside strings (a prompt of code or CSV) are not items: where
the plain count passes the bound, strings are found by their quotes, once their escapes are dropped, and left out.
"""

import json

from loraplex.errors import LoraplexError
from server.tokenizer_pool import MAX_MESSAGES

ITEM_BYTES = (b",", b"[", b"{")
# The fields besides those counted below, and the fields clients send that this server ignores (OpenAI's
# metadata). A chat's tools are rendered into its prompt and count against its characters as its messages do: their
# items fit within the token-id prompts' share below.
OTHER_ITEMS = 4096


class TooManyJsonItems(LoraplexError):
    http_status = 413
    code = "too_many_json_items"


def max_json_items(max_seq_len: int) -> int:
    """The items of the largest honest request of any inference route, and so the bound: 45,088 at max_seq_len
    2048, a body of them parsed in ~2-3 ms at worst (one-id lists: `[3],`)."""
    # here, not above: a fleet's ingress counts items (items_within) and loads no torch, which these modules do
    from server.api.schemas import MAX_CONTENT_PARTS, MAX_LOGIT_BIAS_ENTRIES, MAX_PROMPTS, MAX_STOP_SEQUENCES
    from server.grammar import MAX_GRAMMAR_CHARS
    from server.mixing import MAX_MIX_ADAPTERS

    return (
        MAX_PROMPTS * max_seq_len  # a batch of token-id prompts, each up to max_seq_len ids (/detokenize's: one)
        + MAX_GRAMMAR_CHARS // 2  # a JSON schema (its compact JSON): at most an item every two characters
        + 4 * MAX_MESSAGES  # each an object: its bracket, a comma inside, a comma after it, a list of parts
        + 3 * MAX_CONTENT_PARTS  # each an object: its bracket, a comma inside, a comma after it
        + MAX_STOP_SEQUENCES
        + MAX_LOGIT_BIAS_ENTRIES
        + 2 * MAX_MIX_ADAPTERS  # an id and a weight each
        + OTHER_ITEMS
    )


def items_within(body: bytes, limit: int) -> bool:
    """Whether JSON `body` holds at most `limit` items. Its bytes are searched a few times over, never parsed. Of a
    body that is not valid JSON, what json.loads parses before it refuses it is counted as valid JSON would be."""
    if len(body) <= limit or sum(map(body.count, ITEM_BYTES)) <= limit:  # strings' commas and brackets counted too
        return True
    if b'"' not in body:  # no strings: every comma and bracket is an item
        return False
    encoding = json.detect_encoding(body)
    if not encoding.startswith("utf-8"):  # UTF-16 or 32, which json.loads takes: their quotes are not single bytes
        try:
            body = body.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return True  # json.loads refuses it before its first item
    # In JSON a backslash is in a string and escapes the character after it: with the escaped backslashes and quotes
    # dropped (pairs from the left, as the escapes read), every quote left opens or closes a string
    bare = body.replace(b"\\\\", b"").replace(b'\\"', b"") if b"\\" in body else body
    # A container's first value and each item are at most a key and a value, two strings: past this many quotes the
    # items are past the limit, and the quotes are not split (a million strings would cost as much as parsing them)
    if bare.count(b'"') > 4 * (limit + 1):
        return False
    outside = b"".join(bare.split(b'"')[::2])
    return sum(map(outside.count, ITEM_BYTES)) <= limit


def check_items(body: bytes, max_seq_len: int) -> None:
    """TooManyJsonItems where `body` holds more items than any honest request (max_json_items)."""
    from server.api.schemas import MAX_LOGIT_BIAS_ENTRIES, MAX_STOP_SEQUENCES  # here: see max_json_items

    limit = max_json_items(max_seq_len)
    if not items_within(body, limit):
        raise TooManyJsonItems(
            f"the body holds more than {limit:,} JSON items (commas and opening brackets outside strings), more "
            f"than any request to this server needs at max_seq_len {max_seq_len}: send the prompt as text, not token "
            f"ids, and lists within their bounds (at most max_seq_len ids a prompt, {MAX_MESSAGES:,} messages, "
            f"{MAX_STOP_SEQUENCES} stop sequences, {MAX_LOGIT_BIAS_ENTRIES:,} logit_bias entries)"
        )
