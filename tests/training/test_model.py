import pytest
import torch
from tiny import FAMILIES, tiny_model

from training.batching import collate
from training.data import IGNORE, Example
from training.model import CausalLMLoss


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padding_needs_no_attention_mask(family: str):
    """Why the loop runs mask-free: real positions come out the same with and without the padding mask."""
    model = tiny_model(family)
    rows = [Example(list(range(3, 40)), list(range(3, 40))), Example(list(range(5, 20)), list(range(5, 20)))]
    batch = collate(rows, pad_id=0)
    real = torch.tensor([[t < len(r.input_ids) for t in range(batch["input_ids"].shape[1])] for r in rows])
    with torch.no_grad():
        masked = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=real.long()).last_hidden_state
        free = model.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state
    torch.testing.assert_close(free[real], masked[real])


def test_chunked_loss_matches_the_models_own_loss(monkeypatch):
    from peft import LoraConfig, get_peft_model

    import training.model

    monkeypatch.setattr(training.model, "LOSS_CHUNK", 7)  # several chunks even on a tiny batch
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules="all-linear"))
    rows = [Example([5, 6, 7, 8, 9, 10], [IGNORE, IGNORE, 7, 8, 9, 10]), Example([11, 12, 13], [11, 12, 13])]
    batch = collate(rows, pad_id=0)
    total, count = CausalLMLoss(model)(batch["input_ids"], batch["labels"])
    reference = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss  # mean over labelled tokens
    assert count == 6
    torch.testing.assert_close(total / count, reference)
