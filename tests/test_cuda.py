"""What only a GPU runs: CUDA-graph replay of the compiled step, of sampling chains and of steps over some
lanes' rows. Skipped without CUDA (CI has none); run them on a GPU machine with `python -m pytest tests/test_cuda.py`.

The tiny random model in fp32: the graphed paths must choose exactly what the same computation chooses
without graphs or on the host."""

from __future__ import annotations

import pytest
import torch

from conftest import compose
from prospect.context_strategies import create_strategy
from prospect.stream.lanes import LaneRunner
from prospect.stream.runner import StreamRunner
from prospect.stream.settings import StreamSettings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SMALL = dict(max_seq_len=384, reserved_seq_len=32, last_keep_len=64, summary_max_new_tokens=24)


@pytest.fixture(scope="module")
def cuda_model(model_cache_dir):
    from prospect.models.vlm import load_model

    cfg = compose("model=tiny_random", "model.device=cuda", "model.dtype=float32")
    return load_model(cfg.model, model_cache_dir)


def test_the_compiled_graphed_step_gives_the_uncompiled_replies_in_fp32(cuda_model, synthetic_conversations):
    outcomes = []
    for compile in (False, True):
        runner = StreamRunner(cuda_model, create_strategy("drop_middle", **SMALL), StreamSettings(max_new_tokens=8, compile=compile))
        assert runner.static.use_graphs and (runner.static.compiled is not None) == compile
        result = runner.run(synthetic_conversations[0])
        outcomes.append((result.replies, [r["events"] for r in result.trace]))
    assert outcomes[0] == outcomes[1] and len(outcomes[0][0]) >= 4


def test_graphed_sampling_and_row_spans_choose_what_the_host_loop_chooses(cuda_model, synthetic_conversations):
    """Sampling chains (each step's forward replayed from its graph, the draw outside) and two adjacent
    summarizing lanes decoding on their own rows: the same replies and summaries as the host loop."""
    def run(on_device: bool) -> list:
        settings = StreamSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)
        strategies = [create_strategy(name, **SMALL) for name in ("drop_middle", "summarize_and_drop", "summarize_and_drop")]
        strategies[-1].summary_prompt = "Summarize what the user has done so far."
        lanes = LaneRunner(cuda_model, strategies, settings)
        if not on_device:
            for lane in lanes.lanes:
                lane.on_forward = lambda *args: None
        results = lanes.run(synthetic_conversations[0])
        assert all(result.error is None for result in results)
        if on_device:
            assert lanes.static._decode is not None and lanes.static._decode.forwards  # graphed sampling steps ran
        return [(result.replies, [r.get("summary") for r in result.trace]) for result in results]

    assert run(on_device=True) == run(on_device=False)
