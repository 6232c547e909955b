"""One client flooding a running server with cheap requests, every one within the server's bounds, from several
connections without pause until stopped (or --requests answers): beside it, `bench/http_load.py` measures what an
honest client sees.

    python3 bench/flood_client.py --url http://127.0.0.1:8000 --kind chat &
    python3 bench/http_load.py --url http://127.0.0.1:8000 --rate 0 --concurrency 1 --duration 20 ...

Kinds: chat (chats of 1,024 empty messages, refused as too long once templated: tokenizer work only) and
detokenize (/detokenize of --ids ids, 1,000 by default). Prints the answers' status codes as they come, and at the end.
"""

import argparse
import asyncio
from collections import Counter

import httpx

IDS = 1000  # /detokenize's ids a request, by default


def body(kind: str, ids: int) -> tuple[str, dict]:
    """The route and body of one request of `kind`."""
    if kind == "chat":
        return "/v1/chat/completions", {
            "model": "",
            "messages": [{"role": "user", "content": ""}] * 1024,
            "max_tokens": 1,
        }
    return "/detokenize", {"tokens": list(range(3, 3 + ids))}  # past the special ids of most vocabularies


async def flood(url: str, kind: str, connections: int, requests: int | None, ids: int) -> None:
    path, json = body(kind, ids)
    codes: Counter[int] = Counter()
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def one_connection() -> None:
            while requests is None or codes.total() < requests:
                codes[(await client.post(path, json=json)).status_code] += 1
                if codes.total() % 500 == 0:
                    print(dict(codes), flush=True)

        await asyncio.gather(*(one_connection() for _ in range(connections)))
    print(dict(codes), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--kind", choices=["chat", "detokenize"], default="chat")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--requests", type=int, help="stop after about this many answers (default: never)")
    parser.add_argument("--ids", type=int, default=IDS, help="ids a /detokenize request (within the vocabulary)")
    args = parser.parse_args()
    asyncio.run(flood(args.url, args.kind, args.connections, args.requests, args.ids))


if __name__ == "__main__":
    main()
