"""Fixtures of the engine tests: the byte tokenizer and, per family, a tiny model with four saved adapters."""

import pytest
import torch
from enginekit import ADAPTER_CONFIGS, SavedAdapter, save_adapter
from tiny import byte_tokenizer, tiny_model


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def family_setup(tmp_path_factory):
    """family -> (base model, adapters); built once per family for the session."""
    built: dict[str, tuple[torch.nn.Module, list[SavedAdapter]]] = {}

    def get(family: str) -> tuple[torch.nn.Module, list[SavedAdapter]]:
        if family not in built:
            base = tiny_model(family)
            root = tmp_path_factory.mktemp(f"adapters-{family}")
            adapters = [
                save_adapter(base, config, root / name, seed)
                for seed, (name, config) in enumerate(ADAPTER_CONFIGS.items())
            ]
            built[family] = (base, adapters)
        return built[family]

    return get
