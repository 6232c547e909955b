"""Runs the published TGI and LoRAX clients' generation-parity features against a server; prints what they got.

In the clients' own venv (see tgi_clients.py):  python parity_clients.py URL ADAPTER_A ADAPTER_B SCHEMA_JSON
grammar (JSON schema, regex), details with top_n_tokens, best_of; LoRAX response_format and merged_adapters.
"""

import json
import sys

from lorax import Client as LoraxClient
from lorax.types import MergedAdapters
from text_generation import Client as TgiClient
from text_generation.types import Grammar, GrammarType

url, adapter_a, adapter_b, schema = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
prompt = "Describe a city as JSON."
out: dict[str, object] = {}

tgi = TgiClient(url, timeout=120)
response = tgi.generate(prompt, max_new_tokens=40, grammar=Grammar(type=GrammarType.Json, value=schema))
out["tgi_json"] = {"text": response.generated_text, "finish_reason": response.details.finish_reason.value}
response = tgi.generate(
    "Answer yes or no:", max_new_tokens=8, grammar=Grammar(type=GrammarType.Regex, value=r"(yes|no), [0-9]{1,2}")
)
out["tgi_regex"] = response.generated_text
response = tgi.generate("The capital of France is", max_new_tokens=4, top_n_tokens=3)
out["tgi_top_n"] = {
    "tokens": [[t.id, t.logprob] for t in response.details.tokens],
    "top_tokens": [[[t.id, t.logprob] for t in top] for top in response.details.top_tokens],
}
response = tgi.generate("The capital of France is", max_new_tokens=4, best_of=2, do_sample=True)
out["tgi_best_of"] = {
    "text": response.generated_text,
    "others": [s.generated_text for s in response.details.best_of_sequences or []],
}

lorax = LoraxClient(url, timeout=120)
response = lorax.generate(
    prompt, adapter_id=adapter_a, max_new_tokens=40, response_format={"type": "json_object", "schema": schema}
)
out["lorax_json"] = {"text": response.generated_text, "finish_reason": response.details.finish_reason.value}
mix = MergedAdapters(ids=[adapter_a, adapter_b], weights=[0.5, 0.5], merge_strategy="linear", density=1.0)
response = lorax.generate("The capital of France is", merged_adapters=mix, max_new_tokens=4)
out["lorax_mix"] = {"text": response.generated_text, "tokens": [t.id for t in response.details.tokens]}
print(json.dumps(out))
