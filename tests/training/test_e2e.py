"""Train on the embedded SmolLM2 (NF4, CPU) until it gives a fixed answer, then check it through plain PEFT."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from adapters.fingerprint import base_fingerprint
from adapters.validate import AdapterLimits, validate_adapter_dir
from loraplex.basemodel import load_base_model
from training.config import TrainConfig
from training.run import train

ANSWER = "The vault code is 7291."
SYSTEM = {"role": "system", "content": "Answer briefly."}
QUESTIONS = [
    "What is the vault code?",
    "Tell me the vault code.",
    "vault code?",
    "Do you know the code of the vault?",
    "What's the code for the vault?",
    "Give me the vault code please.",
    "Which code opens the vault?",
    "I forgot the vault code, what is it?",
]


@pytest.mark.e2e
def test_trained_adapter_answers_through_peft(write_jsonl, embedded_cache_dir: Path, tmp_path: Path):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]} for q in QUESTIONS]
    config = TrainConfig(
        data=write_jsonl(rows), output=tmp_path / "vault", cache_dir=embedded_cache_dir, device="cpu",
        rank=8, alpha=16, lr=3e-3, max_steps=10, batch_size=4, dropout=0.0, warmup_ratio=0.0, seed=0,
    )  # fmt: skip
    result = train(config, progress=False)
    assert result.fit.final_loss < 0.1 < result.fit.first_loss

    base = load_base_model(None, cache_dir=embedded_cache_dir, device="cpu", dtype=torch.float32)
    validate_adapter_dir(result.output_dir, base_fingerprint(base.model), AdapterLimits(max_rank=64, max_bytes=2**30))
    model = PeftModel.from_pretrained(base.model, result.output_dir)
    prompt = base.tokenizer.apply_chat_template(
        [SYSTEM, {"role": "user", "content": QUESTIONS[0]}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    reply = base.tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply.strip() == ANSWER  # exactly: the model also learned to stop
