"""One run as a plain function: config -> dataset -> ... (tests call `run(cfg)` directly)."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from prospect.data import load_dataset

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> dict:
    loaded = load_dataset(cfg.dataset)
    for conversation in loaded.conversations:
        log.info(
            "%s: %d stream frames, %d reference turns", conversation.id, conversation.num_frames, len(conversation.references)
        )
    return {"conversations": len(loaded.conversations), "skipped": len(loaded.skipped)}
