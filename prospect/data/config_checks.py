"""Checks of the `dataset` config group (conf/dataset/*.yaml) before any data is read or generated: one line
naming the key and what is allowed (the ProAssist folder, subset and annotation file are looked up)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, ListConfig

from prospect.conf_files import group_options
from prospect.config_values import ConfigError, get_bool, get_choice, get_int, get_number, get_value
from prospect.data import proassist, synthetic


def check_dataset(dataset: DictConfig, search_path: Iterable[str] = ()) -> None:
    """The dataset is one of the group's options (search_path: a user's config folders); the selection keys;
    then the generator's settings (synthetic) or the ProAssist files (any other dataset)."""
    name = get_choice(dataset, "name", "dataset", group_options("dataset", search_path=search_path))
    video_ids = get_value(dataset, "video_ids", "dataset")
    if video_ids is not None and not (
        isinstance(video_ids, (ListConfig, list)) and all(isinstance(v, str) for v in video_ids)
    ):
        raise ConfigError(f"dataset.video_ids={video_ids}: must be null or a list of video_uid strings")
    get_int(dataset, "max_videos", "dataset", minimum=1, optional=True)
    user_types = dataset.get("user_types")
    if user_types is not None and not (
        isinstance(user_types, (ListConfig, list)) and user_types and all(isinstance(v, str) for v in user_types)
    ):
        raise ConfigError(f"dataset.user_types={user_types}: must be null or a non-empty list of user types")
    subset = str(get_value(dataset, "subset", "dataset"))
    annotation = str(get_value(dataset, "annotation", "dataset"))
    root = get_value(dataset, "root", "dataset")
    if name == "synthetic":
        _check_generator(get_value(dataset, "generate", "dataset"), annotation)
    else:
        _check_proassist_files(root, subset, annotation)


def _check_generator(generate: DictConfig, annotation: str) -> None:
    """dataset.generate: what the synthetic generator makes; the annotation must be one it writes."""
    get_int(generate, "videos", "dataset.generate", minimum=1)
    get_number(generate, "seconds", "dataset.generate", 8.0, 36000.0)
    get_number(generate, "fps", "dataset.generate", 0.0, 60.0, low_open=True)
    get_int(generate, "seed", "dataset.generate")
    get_bool(generate, "knowledge", "dataset.generate")
    if "named_user" in generate:
        get_bool(generate, "named_user", "dataset.generate")
    producible = [synthetic.annotation_name(False)] + ([synthetic.annotation_name(True)] if generate.knowledge else [])
    if annotation not in producible:
        raise ConfigError(f"dataset.annotation={annotation}: the synthetic generator writes {', '.join(producible)}")


def _check_proassist_files(root: object, subset: str, annotation: str) -> None:
    """`{root}/processed_data/{subset}/prepared/{annotation}.jsonl` exists; else what is there instead."""
    if root is None:
        raise ConfigError("dataset.root: not set; pass dataset.root=DIR (the folder holding processed_data/) or set PROASSIST_DATA_ROOT")
    root_path = Path(str(root)).expanduser()
    if not root_path.is_dir():
        raise ConfigError(f"dataset.root={root}: no such directory")
    if not proassist.subset_dir(root_path, subset).is_dir():
        found = ", ".join(proassist.available_subsets(root_path)) or f"none under {root_path / 'processed_data'}"
        raise ConfigError(f"dataset.subset={subset}: not found in {root_path / 'processed_data'}; available: {found}")
    if not proassist.annotation_path(root_path, subset, annotation).is_file():
        found = ", ".join(proassist.available_annotations(root_path, subset)) or "none"
        raise ConfigError(
            f"dataset.annotation={annotation}: {proassist.annotation_path(root_path, subset, annotation)} missing; available: {found}"
        )
