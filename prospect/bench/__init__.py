"""`python -m prospect.bench`: the eager reference path against the optimized path, in the same run.

    python -m prospect.bench [--model smolvlm2_2b] [--seconds 230] [--turns 39] [--reply-tokens 30] [--out bench.json]
    python -m prospect.bench grid [--fused] [--jobs-per-gpu 4] [--lanes-per-gpu 12] [--part PARTS] [--out grid.json]
    python -m prospect.bench zoo [--model smolvlm2_2b] [--seconds 230] [--last-keep 512] [--out zoo.json]
    python -m prospect.bench dataset [--conversations 16] [--conversation-batch 16] [--seconds 230] [--out dataset.json]

The first form is the single-stream benchmark (prospect.bench.stream), the second the sweep throughput of the
12-job strategy grid (prospect.bench.grid), the third the reduction cost of every bounded strategy
(prospect.bench.zoo), the fourth a dataset's conversations one by one against several at once as lanes
(prospect.bench.dataset); each module's docstring says what it measures. All write JSON. The command line is
prospect.bench.__main__; prospect.bench.common holds the bench video, model and report header.
"""

from prospect.bench.grid import reply_agreement  # named in docs/sweeps.md as prospect.bench.reply_agreement

__all__ = ["reply_agreement"]
