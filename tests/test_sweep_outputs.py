"""Sweep outputs for people (issue 11): a fake 12-job sweep (4 strategies x 3 last_keep_len) written
with the repo's own results documents and traces, summarised by the real code. summary.md/csv list the
shared overrides once and label rows by the varying ones; the plots' legends too; cache_timelines.png
has a panel per strategy with its legend inside the figure; eval=none still gives a pareto.png that says
F1 is absent."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from prospect.eval.intervals import interval
from prospect.tracking.job_files import write_json
from prospect.report import main as report_main
from prospect.sweep.callbacks import SweepSummary
from prospect.sweep.collect import NO_VALUES_REASON, collect_jobs, distinct_rows
from prospect.sweep.overrides import Overrides
from prospect.sweep.summary import cache_timelines_figure, write_summary
from prospect.sweep.tables import metrics_table, number_text
from prospect.tracking.results import job_key, results_document, stream_metrics
from prospect.tracking.sweep_figures import pareto_figure
from prospect.validation import CONF_DIR

STRATEGIES = ("none", "drop_all", "drop_middle", "summarize_and_drop")
KEEP = (256, 512, 1024)
KV_BYTES_PER_TOKEN = 23040  # 30 layers x 3 KV heads x 64 dims x (K, V) x 2 bytes
EXCLUDED_FROM_FOLDER = ("logger", "cache_root")  # as conf/config.yaml's override_dirname excludes them
ENV = {"git_commit": "0" * 40, "git_dirty": False, "python": "3.11.7", "torch": "2.5.0", "transformers": "4.57.0",
       "device": "cuda:0", "device_name": "NVIDIA H200", "cuda_visible_devices": "0", "hostname": "node1"}


def fake_trace(strategy: str, last_keep_len: int, max_seq_len: int, conversations: int = 2, frames: int = 120) -> list[dict]:
    """Trace records as the runner writes them: 70 tokens a frame, a 40-token reply every 10 frames, a
    reduction when the next chunk would pass max_seq_len - 128 (none: after every frame)."""
    base, records = 300, []
    milliseconds = {"none": 38.0, "drop_all": 41.0, "drop_middle": 44.0 + last_keep_len / 128, "summarize_and_drop": 63.0}[strategy]
    event = {"none": "reset", "drop_all": "compress", "drop_middle": "compress", "summarize_and_drop": "summary"}[strategy]
    for c in range(conversations):
        cache = base
        for index in range(frames):
            before = cache
            cache += 70
            events = ["frame"]
            if index % 10 == 5:
                cache += 40
                events.append("speak")
            record = {"conversation": f"assembly_{c:03d}/0/no_talk_0", "index": index, "time": 0.5 * (index + 1),
                      "cache_before": before, "cache_after": cache, "cache_max": cache, "next_position": index * 70,
                      "events": events, "chunk_tokens": 70, "generated_tokens": 12 * ("speak" in events),
                      "reply": "Attach the wheels." if "speak" in events else None,
                      "wall_ms": milliseconds + (index % 7) * 0.5}
            target = {"none": base, "drop_all": base, "drop_middle": base + last_keep_len, "summarize_and_drop": base + 220}[strategy]
            if strategy == "none" or cache + 110 > max_seq_len - 128:
                record["events"].append(event)
                record["reductions"] = [{"before": cache, "after": target}]
                cache = target
                record["cache_after"] = cache
            records.append(record)
    return records


def make_sweep(root: Path, evaluation: str) -> Path:
    """A 12-job sweep folder as `python -m prospect.run -m ... strategy=... strategy.last_keep_len=...`
    leaves it: job folders with .hydra/overrides.yaml, results.json (reused ones marked cached), trace.jsonl."""
    sweep = root / "multirun" / "2026-11-30" / "12-00-00"
    sweep.mkdir(parents=True)
    common = ["logger=none", f"cache_root={root / 'multirun'}", "model=smolvlm2_256m", f"eval={evaluation}", "dataset.generate.seconds=60"]
    computed: dict[str, Path] = {}
    number = 0
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for strategy in STRATEGIES:
            for keep in KEEP:
                overrides = [*common, f"strategy={strategy}", f"strategy.last_keep_len={keep}"]
                config = OmegaConf.to_container(compose("config", overrides=overrides), resolve=True)
                key = job_key(config)
                dirname = ",".join(sorted(o for o in overrides if o.split("=")[0] not in EXCLUDED_FROM_FOLDER))
                folder = sweep / f"{number}_{dirname}"
                (folder / ".hydra").mkdir(parents=True)
                (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
                if key in computed:  # the result cache reuses the job with the same key (last_keep_len unused)
                    source = computed[key]
                    document = json.loads((source / "results.json").read_text())
                    document.update(cached=True, cached_from=str(source), config=config)
                    (folder / "trace.jsonl").write_text((source / "trace.jsonl").read_text())
                else:
                    trace = fake_trace(strategy, keep, config["strategy"]["max_seq_len"])
                    conversations = sorted({r["conversation"] for r in trace})
                    per_trace = [[r for r in trace if r["conversation"] == c] for c in conversations]
                    metrics = stream_metrics(per_trace, 5400.0, KV_BYTES_PER_TOKEN)
                    per_conversation = {c: stream_metrics([t], 5400.0, KV_BYTES_PER_TOKEN) for c, t in zip(conversations, per_trace)}
                    if evaluation != "none":
                        f1 = {"none": 0.21, "drop_all": 0.33, "drop_middle": 0.36 + keep / 10000, "summarize_and_drop": 0.41}[strategy]
                        metrics.update(f1=f1, precision=f1 + 0.05, recall=f1 - 0.04, num_matched=5)
                    document = results_document("ok", None, metrics, per_conversation, config, ENV, key,
                                                {"started_at": 1796064000.0 + number, "finished_at": 1796064060.0 + number})
                    (folder / "trace.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trace))
                    computed[key] = folder
                write_json(folder / "results.json", document)
                number += 1
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    return sweep


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[Path, dict]:
    sweep = make_sweep(tmp_path_factory.mktemp("evaluated"), "offline")
    return sweep, write_summary(sweep)


@pytest.fixture(scope="module")
def unevaluated(tmp_path_factory) -> Path:
    return make_sweep(tmp_path_factory.mktemp("unevaluated"), "none")


def _table_lines(markdown: str) -> list[str]:
    """The lines of summary.md's first table (the metrics; the paired differences follow it)."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_markdown_lists_shared_overrides_once_and_labels_rows_by_varying_ones(evaluated):
    sweep, summary = evaluated
    assert summary["jobs"] == 12 and len(summary["rows"]) == 6  # drop_middle alone uses last_keep_len
    assert summary["overrides"].varying == ["strategy", "strategy.last_keep_len"]
    markdown = (sweep / "summary.md").read_text()
    shared_line = next(line for line in markdown.splitlines() if line.startswith("Shared by all jobs:"))
    for override in ("logger=none", "model=smolvlm2_256m", "eval=offline", "dataset.generate.seconds=60", "cache_root="):
        assert shared_line.count(override) == 1 and markdown.count(override) == 1, override
    header, _, *rows = _table_lines(markdown)
    assert markdown.index(shared_line) < markdown.index(header)
    assert header.startswith("| jobs | strategy | strategy.last_keep_len | status | f1 |")
    assert len(rows) == 6 and not any("=" in row for row in rows)
    assert "| 3 4 5 | drop_all | 256, 512, 1024 | ok |" in markdown
    assert "| 7 | drop_middle | 512 | ok |" in markdown
    labels = [row["label"] for row in summary["rows"]]
    assert labels[0] == "strategy=none strategy.last_keep_len=256,512,1024"
    assert "strategy=drop_middle strategy.last_keep_len=1024" in labels
    assert all(set(part.split("=")[0] for part in text.split()) == {"strategy", "strategy.last_keep_len"} for text in labels)
    assert "read_csv" in markdown  # the md says how summary.csv is laid out


def test_csv_reads_with_pandas_one_row_per_job(evaluated):
    sweep, summary = evaluated
    table = pd.read_csv(sweep / "summary.csv")
    assert len(table) == 12 and list(table.job) == list(range(12))
    assert list(table.columns[:3]) == ["job", "strategy", "strategy.last_keep_len"]
    assert table["strategy.last_keep_len"].dtype.kind == "i" and table.f1.dtype.kind == "f"
    assert table.shared_overrides.nunique() == 1
    assert table.shared_overrides[0].split() == summary["overrides"].shared
    assert table.job_key.nunique() == 6 and table.cached.sum() == 6
    grid = table.pivot(index="strategy", columns="strategy.last_keep_len", values="f1")
    assert grid.shape == (4, 3) and grid.loc["drop_all"].nunique() == 1 and grid.loc["drop_middle"].nunique() == 3
    assert all((sweep / folder / "results.json").is_file() for folder in table.folder)


def test_results_without_intervals_get_them_from_their_per_conversation_rows(evaluated):
    """These results.json are written as before runs recorded `intervals`: the summary computes them."""
    sweep, summary = evaluated
    document = json.loads((sweep / summary["records"][0]["folder"] / "results.json").read_text())
    assert "intervals" not in document
    expected = interval(document["per_conversation"], "time_per_frame")
    row = summary["rows"][0]
    assert (row["time_per_frame_low"], row["time_per_frame_high"]) == (expected["low"], expected["high"])
    table = pd.read_csv(sweep / "summary.csv")
    assert table.time_per_frame_low[0] == pytest.approx(expected["low"]) and table.time_per_frame_high[0] == pytest.approx(expected["high"])
    # their F1 is pooled only (the per-conversation rows carry no counts): the value, and a footnote saying why
    assert row["intervals"]["f1"] == {"reason": NO_VALUES_REASON} and pd.isna(table.f1_low[0]) and NO_VALUES_REASON in table.intervals_note[0]
    cells, footnotes = metrics_table(summary["rows"], summary["overrides"])
    assert cells[0]["f1"] == f"{number_text(document['metrics']['f1'])} ¹" and footnotes == [f"¹ {NO_VALUES_REASON}"]
    assert "[" in cells[0]["time_per_frame"]


def test_cache_timelines_one_panel_per_strategy_legends_inside(evaluated):
    sweep, summary = evaluated
    assert (sweep / "cache_timelines.png").is_file() and (sweep / "pareto.png").is_file()
    figure = cache_timelines_figure(distinct_rows(collect_jobs(sweep)), summary["overrides"])
    assert [axis.get_title(loc="left") for axis in figure.axes] == [f"strategy={s}" for s in STRATEGIES]
    figure.canvas.draw()
    bounds = figure.bbox
    for axis in figure.axes:
        legend = axis.get_legend()
        texts = [t.get_text() for t in legend.get_texts()]
        assert texts and all("strategy=" not in t and "model=" not in t and "eval=" not in t for t in texts), texts
        extent = legend.get_window_extent()
        assert bounds.x0 - 1 <= extent.x0 and extent.x1 <= bounds.x1 + 1 and bounds.y0 - 1 <= extent.y0 and extent.y1 <= bounds.y1 + 1
    middle = [t.get_text() for t in figure.axes[2].get_legend().get_texts()]
    assert middle == ["last_keep_len=256", "last_keep_len=512", "last_keep_len=1024", "max_seq_len"]


def test_pareto_legend_uses_varying_overrides(evaluated):
    _, summary = evaluated
    figure = pareto_figure(summary["rows"])
    # these fake jobs have F1 but no reference perplexity: F1 against memory and against time per frame
    assert len(figure.axes) == 2 and [a.get_ylabel() for a in figure.axes] == ["F1 (higher is better)"] * 2
    texts = [t.get_text() for t in figure.legends[0].get_texts()]
    assert texts[:-1] == [row["legend"] for row in summary["rows"]] and texts[-1] == "Pareto front"
    assert "strategy=drop_all last_keep_len=256,512,1024" in texts
    assert not any("model=" in t or "logger=" in t for t in texts)


def test_without_evaluation_pareto_shows_kv_memory_and_says_f1_is_absent(unevaluated, capsys, caplog):
    sweep = unevaluated
    assert report_main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "note: F1 absent" in out and (sweep / "pareto.png").is_file()
    markdown = (sweep / "summary.md").read_text()
    assert "F1 absent" in markdown and "| f1 |" not in markdown  # no empty F1 columns
    summary = write_summary(sweep)
    figure = pareto_figure(summary["rows"])
    (axis,) = figure.axes
    assert axis.get_xlabel() == "time per frame (s)" and "KV-cache memory" in axis.get_ylabel()
    assert "F1 absent" in figure.get_suptitle()
    assert "F1 absent" in axis.get_title()
    assert len(axis.collections) == 6  # one point per distinct job
    with caplog.at_level("WARNING", logger="prospect.sweep.callbacks"):
        SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert any("F1 absent" in record.getMessage() for record in caplog.records)


def test_missing_job_listed_by_its_varying_overrides(tmp_path, unevaluated):
    import shutil

    sweep = tmp_path / "copy"
    shutil.copytree(unevaluated, sweep)
    victim = next(sweep.glob("7_*"))
    (victim / "results.json").unlink()
    summary = write_summary(sweep)
    assert summary["overrides"].shared == Overrides.of(collect_jobs(unevaluated)).shared
    markdown = (sweep / "summary.md").read_text()
    assert "- jobs 7 (strategy=drop_middle strategy.last_keep_len=512): missing: no results.json" in markdown
    table = pd.read_csv(sweep / "summary.csv")
    assert table.loc[table.job == 7, "status"].item() == "missing"
