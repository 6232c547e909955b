"""Runs the published TGI and LoRAX clients against a server; prints what they got as JSON.

They pin huggingface-hub < 1.0, which clashes with transformers 5, so this runs in their own venv:
    python tgi_clients.py URL PROMPT MAX_NEW_TOKENS [ADAPTER]
"""

import json
import sys

from lorax import Client as LoraxClient
from text_generation import Client as TgiClient

url, prompt, max_new = sys.argv[1], sys.argv[2], int(sys.argv[3])
adapter = sys.argv[4] if len(sys.argv) > 4 else None
out: dict[str, dict] = {}

tgi = TgiClient(url, timeout=120)
if adapter is None:  # TGI itself has no adapters
    response = tgi.generate(prompt, max_new_tokens=max_new)
    streamed = [r for r in tgi.generate_stream(prompt, max_new_tokens=max_new)]
    out["text-generation"] = {
        "text": response.generated_text,
        "finish_reason": response.details.finish_reason.value,
        "tokens": [t.id for t in response.details.tokens],
        "stream_text": "".join(r.token.text for r in streamed),
        "stream_generated_text": streamed[-1].generated_text,
    }

lorax = LoraxClient(url, timeout=120)
response = lorax.generate(prompt, adapter_id=adapter, max_new_tokens=max_new)
streamed = [r for r in lorax.generate_stream(prompt, adapter_id=adapter, max_new_tokens=max_new)]
out["lorax-client"] = {
    "text": response.generated_text,
    "finish_reason": response.details.finish_reason.value,
    "tokens": [t.id for t in response.details.tokens],
    "stream_text": "".join(r.token.text for r in streamed),
    "stream_generated_text": streamed[-1].generated_text,
}
print(json.dumps(out))
