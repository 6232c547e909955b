import pytest
import torch
from tiny import FAMILIES, tiny_model

from loraplex.basemodel import load_base_model
from training.batching import collate
from training.config import TrainConfig
from training.data import IGNORE, Example
from training.model import CausalLMLoss, add_lora


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


@pytest.mark.parametrize(("share", "recomputed"), [(1.0, 2), (0.5, 1), (0.01, 1)])
def test_a_share_of_the_layers_recomputes_and_every_gradient_is_the_same(
    tiny_model_dirs, tmp_path, share: float, recomputed: int
):
    """--checkpoint-share on an NF4 model: the first ceil(share x layers) decoder layers run their forward again
    in the backward (their activations recomputed), the rest once (kept); the LoRA gradients are the same bits as
    with every layer recomputed and with none."""
    rows = [Example(list(range(3, 30)), list(range(3, 30))), Example(list(range(7, 19)), list(range(7, 19)))]
    batch = collate(rows, pad_id=0)

    def gradients(checkpointing: bool, share: float) -> tuple[dict[str, torch.Tensor], list[int]]:
        run = TrainConfig(data=tmp_path / "d.jsonl", output=tmp_path / "out", rank=4, dropout=0.0,
                          gradient_checkpointing=checkpointing, checkpoint_share=share)  # fmt: skip
        base = load_base_model(str(tiny_model_dirs["llama"]), cache_dir=tmp_path, device="cpu", dtype=torch.float32)
        torch.manual_seed(0)  # the same LoRA initialisation each time
        model = add_lora(base.model, run, gradient_checkpointing=checkpointing, compute_dtype=torch.float32)
        layers = model.get_decoder().layers
        calls = [0] * len(layers)
        for i, layer in enumerate(layers):  # the layer's own hooks run once: its forward is what is recomputed
            layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        total, _ = CausalLMLoss(model.train())(batch["input_ids"], batch["labels"])
        total.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}, calls

    grads, calls = gradients(True, share)
    assert calls == [2] * recomputed + [1] * (2 - recomputed)
    for reference in (gradients(True, 1.0)[0], gradients(False, 1.0)[0]):
        assert grads.keys() == reference.keys() and len(grads) == 2 * 7 * 2  # A and B of 7 projections a layer
        for name, grad in grads.items():
            assert torch.equal(grad, reference[name]), name
