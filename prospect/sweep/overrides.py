"""The overrides of a sweep's jobs: those every job shares (listed once) and those that vary (each job or row
is labelled by these). A job without .hydra/overrides.yaml has its overrides read from its results.json's
config where that tells them; a key it leaves unknown is counted as varying, never shared."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prospect.sweep.collect import Job, split_override


def _join(key: str, value: str) -> str:
    return f"{key}={value}" if value or not key.startswith("~") else key


def _parse(value: str) -> Any:
    """An override's value as a config holds it: '256' -> 256, 'true' -> True, '1e-3' -> 0.001, 'cpu' -> 'cpu'."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def _same(override: str, value: Any) -> bool:
    """Whether an override's value is the config value (bools only equal bools, numbers compare as numbers)."""
    parsed = _parse(override)
    if isinstance(parsed, bool) or isinstance(value, bool):
        return parsed is value
    return parsed == value


def _config_value(config: dict | None, key: str) -> tuple[bool, Any]:
    """(found, value) of an override's key in a job's resolved config; a config group's value is its option's
    `name` (strategy=drop_all: config["strategy"]["name"], as every file under conf/ sets it)."""
    key = key.lstrip("+")
    if not config or not key or key.startswith("~"):
        return False, None
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    if isinstance(node, dict):
        return (True, node["name"]) if isinstance(node.get("name"), str) else (False, None)
    return True, node


def _infer_settings(job: Job, keys: Sequence[str], known: Sequence[dict[str, str]]) -> dict[str, str]:
    """{key: value} of a job whose overrides are unknown, for the keys its results.json's config tells:
    written as another job wrote the same value where one did."""
    config = (job.results or {}).get("config")
    settings = {}
    for key in keys:
        found, value = _config_value(config, key)
        if not found:
            continue
        written = next((s[key] for s in known if key in s and _same(s[key], value)), None)
        if written is None:
            if isinstance(value, (dict, list)):
                written = json.dumps(value, separators=(",", ":"))
            else:
                written = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        settings[key] = written
    return settings


@dataclass
class Overrides:
    """The overrides every job shares (as written, in command-line order) and the keys that vary.
    `inferred`: {job folder: settings} of the jobs without .hydra/overrides.yaml, read from their
    results.json's config (the keys it does not tell are missing: such a key is varying, not shared)."""

    shared: list[str]
    varying: list[str]
    inferred: dict[Path, dict[str, str]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(cls, jobs: Sequence[Job]) -> Overrides:
        known = [job.settings for job in jobs if job.known]
        keys = list(dict.fromkeys(key for settings in known for key in settings))
        inferred = {job.folder: _infer_settings(job, keys, known) for job in jobs if not job.known}
        every = known + list(inferred.values())  # an unknown job's missing key makes that key vary
        shared, varying = [], []
        for key in keys:
            values = {settings.get(key) for settings in every}
            if len(values) == 1 and None not in values:
                shared.append(_join(key, known[0][key]))
            else:
                varying.append(key)
        return cls(shared, varying, inferred)

    def settings(self, job: Job) -> dict[str, str]:
        """The job's overrides as {key: value}: its own, or those read from its results.json's config."""
        return job.settings if job.known else self.inferred.get(job.folder, {})

    def values(self, jobs: Iterable[Job]) -> dict[str, list[str]]:
        """{varying key: its distinct values over these jobs, in job order} (a key no job sets: [])."""
        settings = [self.settings(job) for job in jobs]
        return {key: list(dict.fromkeys(s[key] for s in settings if key in s)) for key in self.varying}

    @property
    def unknown(self) -> list[Path]:
        """The folders of the jobs without .hydra/overrides.yaml."""
        return list(self.inferred)

    def short_keys(self) -> dict[str, str]:
        """For plots: each varying key by its last dotted part where that is unambiguous
        (strategy.last_keep_len -> last_keep_len)."""
        tails = [key.rsplit(".", 1)[-1] for key in self.varying]
        return {key: tail if tails.count(tail) == 1 else key for key, tail in zip(self.varying, tails)}


def label(values: dict[str, list[str]], names: dict[str, str] | None = None, skip: Iterable[str] = ()) -> str:
    """'strategy=drop_all strategy.last_keep_len=256,512' from {key: values}: the varying overrides only."""
    names = names or {}
    return " ".join(_join(names.get(key, key), ",".join(v)) for key, v in values.items() if v and key not in set(skip))
