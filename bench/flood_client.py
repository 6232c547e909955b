"""One client flooding a running server with cheap requests, every one within the server's bounds, from several
connections without pause until stopped (or --requests answers): beside it, `bench/http_load.py` measures what an
honest client sees.

    python3 bench/flood_client.py --url http://127.0.0.1:8000 --kind chat &
    python3 bench/http_load.py --url http://127.0.0.1:8000 --rate 0 --concurrency 1 --duration 20 ...

Kinds: chat (chats of 1,024 empty messages, refused as too long once templated: tokenizer work only), detokenize
(/detokenize of --ids ids, 1,000 by default), token_batches (/v1/completions whose prompt is OpenAI's batch of
token-id prompts, a million one-id prompts in a body just under --mb MiB: cheap to send, the costliest JSON to
parse per byte, refused before it is parsed), generate (/v1/completions of --n answers of --max-tokens tokens on the
base model, ignoring end of sequence: with more --connections than the server's --max-queue, the queue stays full;
with more connections x n than its --max-batch-size, every row runs this client's answers) and score
(/v1/completions scoring a prompt of --ids token ids: echo with logprobs and max_tokens 0, as
lm-evaluation-harness's loglikelihood requests) and prompts (/v1/completions of a long prompt, --ids token ids,
and --max-tokens tokens of answer: a client sending long documents). --key sends a Bearer key, so that a server
with keys tells this client from the others. Prints the answers' status codes as they come, and at the end.
"""

import argparse
import asyncio
import json
import random
from collections import Counter

import httpx

IDS = 1000  # /detokenize's ids a request, by default
MB = 4  # the server's --max-request-mb by default
BATCH_ITEM = "[3],"  # one prompt of one id in a batch, as it is written in the body


def long_prompt(ids: int, max_tokens: int) -> bytes:
    """A prompts request: random ids, so that no prompt starts with another's cached tokens."""
    prompt = [random.randrange(3, 256) for _ in range(ids)]
    return json.dumps({"model": "", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}).encode()


def body(kind: str, ids: int, mb: int, max_tokens: int, n: int = 1) -> tuple[str, bytes]:
    """The route and JSON body of one request of `kind`."""
    if kind == "generate":
        return "/v1/completions", json.dumps({
            "model": "", "prompt": "a flood of answers", "max_tokens": max_tokens, "n": n, "ignore_eos": True
        }).encode()  # fmt: skip
    if kind == "score":
        return "/v1/completions", json.dumps({
            "model": "", "prompt": list(range(3, 3 + ids)), "max_tokens": 0, "echo": True, "logprobs": 1
        }).encode()  # fmt: skip
    if kind == "prompts":
        return "/v1/completions", long_prompt(ids, max_tokens)
    if kind == "chat":
        return "/v1/chat/completions", json.dumps({
            "model": "",
            "messages": [{"role": "user", "content": ""}] * 1024,
            "max_tokens": 1,
        }).encode()  # fmt: skip
    if kind == "token_batches":
        head = b'{"model": "", "max_tokens": 1, "prompt": ['
        prompts = ((mb << 20) - len(head) - 2) // len(BATCH_ITEM)
        return "/v1/completions", head + (BATCH_ITEM * prompts)[:-1].encode() + b"]}"
    return "/detokenize", json.dumps({"tokens": list(range(3, 3 + ids))}).encode()  # past most special ids


async def flood(
    url: str, kind: str, connections: int, requests: int | None, ids: int, mb: int, max_tokens: int, n: int,
    key: str | None,
) -> None:  # fmt: skip
    path, encoded = body(kind, ids, mb, max_tokens, n)  # encoded once: the client's own CPU goes to sending

    def content() -> bytes:
        return long_prompt(ids, max_tokens) if kind == "prompts" else encoded  # prompts: another each request

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    codes: Counter[int] = Counter()
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one_connection() -> None:
            while requests is None or codes.total() < requests:
                codes[(await client.post(path, content=content(), headers=headers)).status_code] += 1
                if codes.total() % 500 == 0:
                    print(dict(codes), flush=True)

        await asyncio.gather(*(one_connection() for _ in range(connections)))
    print(dict(codes), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--url", required=True)
    kinds = ["chat", "detokenize", "token_batches", "generate", "score", "prompts"]
    parser.add_argument("--kind", choices=kinds, default="chat")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--requests", type=int, help="stop after about this many answers (default: never)")
    parser.add_argument("--ids", type=int, default=IDS,
                        help="ids a /detokenize request or a prompt (score, prompts), in the vocabulary")  # fmt: skip
    parser.add_argument("--mb", type=int, default=MB, help="token_batches: bodies just under this many MiB")
    parser.add_argument("--max-tokens", type=int, default=32, help="generate and prompts: tokens an answer")
    parser.add_argument("--n", type=int, default=1, help="generate: answers a request (OpenAI's n)")
    parser.add_argument("--key", help="Bearer key")
    args = parser.parse_args()
    asyncio.run(
        flood(
            args.url, args.kind, args.connections, args.requests, args.ids, args.mb, args.max_tokens, args.n, args.key
        )
    )


if __name__ == "__main__":
    main()
