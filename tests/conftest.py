import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DLLM_RL_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # tests never download: real tasks read the local copies
os.environ.setdefault("DLLM_RL_DATA", str(SHARED_DATA))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models: one intra-op thread is fastest, and stays fast when the cores are shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data folder not found: {SHARED_DATA} (set DLLM_RL_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rollout.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model(tiny_tokenizer):
    from rollout.tiny import build_tiny_model

    return build_tiny_model(tiny_tokenizer, seed=0).eval()


# ---- tiny checkpoints of the published LLaDA / Dream layouts (tests/helpers/published.py) ---------

@pytest.fixture(scope="session")
def published_folder(tmp_path_factory):
    """``published_folder(family, **options)`` -> a tiny published-layout checkpoint folder, built
    once per distinct set of options for the whole session."""
    from helpers.published import build_published_folder

    built = {}

    def make(family: str, **options):
        key = (family, tuple(sorted(options.items())))
        if key not in built:
            name = f"{family}-" + "-".join(f"{k}{v}" for k, v in sorted(options.items()))
            built[key] = build_published_folder(family, tmp_path_factory.mktemp(name), **options)
        return built[key]

    return make
