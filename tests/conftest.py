"""Shared fixtures: configs composed from conf/ as the app composes them, generated data, no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

# Never reach the Hugging Face hub from a test; W&B stays on this machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parent.parent
REFERENCE_SAMPLES = REPO.parent / "shared" / "reference" / "proassist_prepared_sample.jsonl"


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small generated ProAssist-format root (2 videos x 30 s, with knowledge), shared by tests."""
    from prospect.data.synthetic import generate

    root = tmp_path_factory.mktemp("synthetic")
    generate(root, videos=2, seconds=30, fps=2, seed=0, knowledge=True)
    return root


def compose(*overrides: str, tmp_path: Path | None = None) -> DictConfig:
    """The job config `python -m prospect.run OVERRIDES` would get (validated by the caller)."""
    from prospect.validation import compose_config

    cfg = compose_config(list(overrides))
    if tmp_path is not None:
        with open_dict(cfg):
            cfg.paths.cache_dir = str(tmp_path / "cache")
    return cfg


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """Where converted models live between test runs (as for the app): $PROSPECT_CACHE_DIR or ~/.cache/prospect."""
    return Path(os.environ.get("PROSPECT_CACHE_DIR", Path.home() / ".cache" / "prospect"))


@pytest.fixture(scope="session")
def tiny_model(model_cache_dir):
    """The tiny random SmolVLM2 (real tokenizer, 16 image tokens per frame), fp32 on CPU."""
    from prospect.models.vlm import load_model

    cfg = compose("model=tiny_random", "model.device=cpu")
    return load_model(cfg.model, model_cache_dir)


@pytest.fixture(scope="session")
def offline_model(model_cache_dir):
    """The embedded offline default (SmolLM2-135M weights in the SmolVLM2-256M architecture)."""
    from prospect.models.vlm import load_model

    cfg = compose("model.device=cpu")
    return load_model(cfg.model, model_cache_dir)


@pytest.fixture(scope="session")
def synthetic_conversations(synthetic_root):
    from prospect.data.proassist import load_conversations

    return load_conversations(synthetic_root, "synthetic", "dialog-klg_test_L0_I1").conversations
