"""Data: conversation streams from ProAssist-format folders (real or synthetic)."""

from __future__ import annotations

from omegaconf import DictConfig

from prospect.data.proassist import LoadedDataset, load_conversations
from prospect.data.types import Conversation, StreamFrame, Turn

__all__ = ["Conversation", "LoadedDataset", "StreamFrame", "Turn", "load_conversations", "load_dataset"]


def load_dataset(dataset: DictConfig) -> LoadedDataset:
    """Conversations of the `dataset` config group; synthetic data is generated on first use."""
    if dataset.name == "synthetic":
        from prospect.data.synthetic import ensure_generated  # lazy: at the top, `python -m prospect.data.synthetic` would import itself twice (runpy's RuntimeWarning)

        g = dataset.generate
        try:
            ensure_generated(dataset.root, g.videos, g.seconds, g.fps, g.seed, g.knowledge, bool(g.get("named_user", False)))
        except OSError as error:  # a write that names no file (a full disk): name the folder being generated
            if error.filename is None and error.errno is not None:
                raise OSError(error.errno, error.strerror, str(dataset.root)) from error
            raise
    video_ids = list(dataset.video_ids) if dataset.video_ids is not None else None
    user_types = list(dataset.user_types) if dataset.get("user_types") is not None else None
    return load_conversations(dataset.root, dataset.subset, dataset.annotation, video_ids, dataset.max_videos, user_types)
