"""docs/extending.md's promise: a strategy is one Python file plus one YAML. Here both live outside the package
(a module on PYTHONPATH, a YAML in the user's own config folder on hydra.searchpath) and a real sweep runs the
new strategy beside a built-in one, with no other edit, under each of prospect's launchers (the job processes of
gpu_pool and the lanes of a fused worker see the user's config folder too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

STRATEGY = '''
from dataclasses import dataclass

from prospect.cache import cache_length
from prospect.context_strategies import BaseContextStrategy


@dataclass
class KeepNewerHalf(BaseContextStrategy):
    """Over the threshold: keep the initial cache and the newer half of the tokens after it."""

    @property
    def name(self) -> str:
        return "keep_newer_half"

    def handle_overflow(self, past_key_values, last_msg, **context):
        length = cache_length(past_key_values)
        start = self.init_len + (length - self.init_len) // 2
        self.keep(past_key_values, [(0, self.init_len), (start, length)])
        return past_key_values, last_msg
'''


@pytest.mark.parametrize("launcher", ["basic", pytest.param("gpu_pool", marks=pytest.mark.slow),  # CI's slow pass
                                      pytest.param("fused", marks=pytest.mark.slow)])
def test_a_strategy_from_outside_the_package_runs_in_a_sweep(tmp_path, model_cache_dir, launcher):
    package = tmp_path / "my_strategies"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "keep_newer_half.py").write_text(STRATEGY)
    conf = tmp_path / "my_conf"
    (conf / "strategy").mkdir(parents=True)
    (conf / "strategy" / "keep_newer_half.yaml").write_text(
        "_target_: my_strategies.keep_newer_half.KeepNewerHalf\nname: keep_newer_half\n")
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "prospect.run", "-m", f"hydra.searchpath=[file://{conf}]",
               "strategy=drop_middle,keep_newer_half", "model=tiny_random", "model.device=cpu", "logger=none", "eval=none",
               "dataset.generate.seconds=8", "strategy.max_seq_len=400", "strategy.reserved_seq_len=64",
               "strategy.last_keep_len=128", "stream.max_new_tokens=4", f"hydra.sweep.dir={sweep}", f"cache_root={tmp_path}", f"hydra/launcher={launcher}",
               f"paths.cache_dir={model_cache_dir}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    documents = {}
    for folder in sweep.iterdir():
        if (folder / "results.json").is_file():
            document = json.loads((folder / "results.json").read_text())
            documents[document["config"]["strategy"]["name"]] = (folder, document)
    assert set(documents) == {"drop_middle", "keep_newer_half"}
    folder, document = documents["keep_newer_half"]
    assert document["status"] == "ok"
    assert document["config"]["strategy"]["_target_"] == "my_strategies.keep_newer_half.KeepNewerHalf"
    records = [json.loads(line) for line in (folder / "trace.jsonl").read_text().splitlines()]
    reductions = [r for record in records for r in record.get("reductions", [])]
    assert reductions, "the new strategy never reduced the cache: the test would not show it ran"
    assert all(record["cache_after"] <= 400 for record in records)
    assert "keep_newer_half" in (sweep / "summary.md").read_text()
