"""Random adapters have PEFT's layout and pass the server's own validation against the model they name."""

from pathlib import Path

import torch
from peft import PeftModel
from random_adapters import linear_shapes, write_adapters

from adapters.fingerprint import base_fingerprint
from adapters.validate import AdapterLimits, validate_adapter_dir
from loraplex.synthetic import load_synthetic


def test_8b_shapes_come_from_the_config_alone() -> None:
    shapes = linear_shapes("llama3-8b", ("q_proj", "k_proj"))
    assert len(shapes) == 2 * 32
    assert shapes["model.layers.31.self_attn.k_proj"] == (4096, 1024)


def test_adapters_validate_and_load_in_peft(tmp_path: Path) -> None:
    paths = write_adapters("tiny", tmp_path, count=2, rank=4, targets=("q_proj", "down_proj"))
    model, _ = load_synthetic("random:tiny", torch.device("cpu"), torch.float32, quantize=False)
    limits = AdapterLimits(max_rank=8, max_bytes=1 << 20)
    checked = [validate_adapter_dir(path, base_fingerprint(model), limits) for path in paths]
    assert checked[0].rank == 4 and checked[0].target_modules == ["down_proj", "q_proj"]
    assert checked[0].sha256 != checked[1].sha256  # distinct content: the store keeps both
    peft_model = PeftModel.from_pretrained(model, paths[0])
    assert len([n for n in peft_model.state_dict() if ".lora_A." in n]) == 2 * model.config.num_hidden_layers
