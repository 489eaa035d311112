"""Sweep summaries with intervals and paired differences (prospect/sweep/summary.py, prospect.report), over
real sweeps: a tiny-model grid (2 conversations; none, drop_middle and streaming_llm x last_keep_len 64,
128) run with a summary.baseline that names no job of it, and an oracle sweep whose jobs ran 1 or 2
conversations. Expected intervals and differences are computed here by prospect.eval.intervals from the
jobs' own results.json; the summary's choice of baseline is checked against the jobs' overrides.yaml."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pandas as pd
import numpy as np
import pytest
import yaml

from conftest import REPO
from prospect.eval.intervals import interval, paired_difference
from prospect.eval.per_run_metrics import DIFFERENCE_METRICS, SHOWN_WITH_INTERVALS
from prospect.sweep.collect import collect_jobs, distinct_rows
from prospect.sweep.overrides import Overrides
from prospect.sweep.summary import ref_nll_by_turn_figure, write_summary
from prospect.sweep.tables import number_text
from prospect.context_strategies.events import REDUCTION_EVENTS
from prospect.tracking.sweep_figures import pareto_figure
from prospect.validation import ConfigError, check_command_line

TINY_GRID = ["model=tiny_random", "model.device=cpu", "dataset.generate.videos=2", "dataset.generate.seconds=12",
             "strategy=none,drop_middle,streaming_llm", "strategy.last_keep_len=64,128", "strategy.max_seq_len=384",
             "strategy.reserved_seq_len=32", "stream.max_new_tokens=4"]
# jobs 0, 2 ran the first video only; job 1 (the baseline) both
ORACLE_SWEEP = ["model=oracle", "dataset.generate.videos=2", "dataset.generate.seconds=12", "strategy=drop_middle,none",
                "dataset.max_videos=1,2", "summary.baseline=1"]
SUPERSCRIPT_DIGITS = "⁰¹²³⁴⁵⁶⁷⁸⁹"


def run_sweep(root: Path, env_cache: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m prospect.run -m ARGS` into root/grid, the result cache rooted at root."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PROSPECT_CACHE_DIR": str(env_cache)}
    return subprocess.run([sys.executable, "-m", "prospect.run", "-m", "logger=none", f"hydra.sweep.dir={root / 'grid'}",
                           f"cache_root={root}", *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prospect.report", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def jobs_on_disk(sweep: Path) -> dict[int, dict]:
    """{job number: {"overrides": {key: value}, "results": results.json}} read from the job folders."""
    jobs = {}
    for folder in sweep.iterdir():
        if (folder / "results.json").is_file():
            overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
            jobs[int(folder.name.split("_", 1)[0])] = {
                "folder": folder, "overrides": dict(o.split("=", 1) for o in overrides),
                "results": json.loads((folder / "results.json").read_text())}
    return dict(sorted(jobs.items()))


def computed(jobs: dict[int, dict], numbers: str) -> dict:
    """The results of a row ("0 1": the job that computed it, not the copy that reused it)."""
    documents = [jobs[int(n)]["results"] for n in numbers.split()]
    return next((d for d in documents if not d.get("cached")), documents[0])


def tables(markdown: str) -> list[list[dict[str, str]]]:
    """summary.md's tables as {column: cell} rows."""
    found, block = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip()[1:-1].split("|")])
        elif block:
            header, _, *rows = block
            found.append([dict(zip(header, row)) for row in rows])
            block = []
    return found


def footnote_of(cell: str, markdown_part: str) -> str:
    """The footnote text a cell's trailing superscript points to, in the part of summary.md after its table."""
    mark = cell.split()[-1]
    assert mark and all(c in SUPERSCRIPT_DIGITS for c in mark), cell
    return next(line[len(mark) + 1:].strip() for line in markdown_part.splitlines() if line.startswith(mark + " "))


def differences_part(markdown: str) -> str:
    return markdown.split("## Paired differences against the baseline", 1)[1]


def copy_of(sweep: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(sweep, target)
    return target


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, model_cache_dir) -> dict:
    """The tiny-model grid, run with summary.baseline=snapkv (a strategy, but none of this sweep's)."""
    root = tmp_path_factory.mktemp("tiny")
    result = run_sweep(root, model_cache_dir, *TINY_GRID, "summary.baseline=snapkv")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = root / "grid"
    return {"sweep": sweep, "output": result.stdout + result.stderr, "markdown": (sweep / "summary.md").read_text(),
            "jobs": jobs_on_disk(sweep)}


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, model_cache_dir) -> dict:
    root = tmp_path_factory.mktemp("oracle")
    result = run_sweep(root, model_cache_dir, *ORACLE_SWEEP)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = root / "grid"
    return {"sweep": sweep, "markdown": (sweep / "summary.md").read_text(), "jobs": jobs_on_disk(sweep)}


def job_label(overrides: dict[str, str]) -> str:
    return f"strategy={overrides['strategy']} strategy.last_keep_len={overrides['strategy.last_keep_len']}"


def test_a_baseline_naming_no_job_still_gives_the_summary_and_one_error_line(tiny):
    jobs = tiny["jobs"]
    listing = ", ".join(f"{n} ({job_label(job['overrides'])})" for n, job in jobs.items())
    errors = [line for line in tiny["output"].splitlines() if "no job of this sweep" in line]
    assert len(errors) == 1, errors
    assert errors[0].endswith(f"sweep summary: summary.baseline=snapkv: no job of this sweep has strategy snapkv or number "
                              f"snapkv; jobs: {listing}; the summary uses the default baseline (summary.baseline=null)")
    assert "per row, the drop_middle row whose other varying overrides match the row's" in tiny["markdown"]
    assert "(summary.baseline=null)" in tiny["markdown"]


def test_every_job_has_its_metrics_with_intervals_from_its_conversations(tiny, tmp_path):
    jobs, markdown = tiny["jobs"], tiny["markdown"]
    metrics_rows = tables(markdown)[0]
    assert len(metrics_rows) == len({job["results"]["job_key"] for job in jobs.values()}) == 5
    checked = 0
    for cells in metrics_rows:
        results = computed(jobs, cells["jobs"])
        conversations = results["per_conversation"]
        assert len(conversations) == 2
        for name in ("f1", "precision", "recall", "ref_ppl", "ref_top1", "ref_nll", "speak_auc", "time_diff", "avg_cache_size",
                     "time_per_frame"):
            value, expected = number_text(results["metrics"][name]), interval(conversations, name)
            if expected is not None and "low" in expected:
                assert cells[name] == f"{value} [{number_text(expected['low'])}, {number_text(expected['high'])}]", name
                checked += 1
            else:  # e.g. time_diff without a matched turn: the value and why
                assert cells[name].startswith(f"{value} ") and "[" not in cells[name], name
                assert footnote_of(cells[name], markdown.split("## Paired")[0]).startswith("no interval"), name
    assert checked >= 5 * 8
    table = pd.read_csv(tiny["sweep"] / "summary.csv")
    assert len(table) == 6
    for name in SHOWN_WITH_INTERVALS:
        assert {name, f"{name}_low", f"{name}_high"} <= set(table.columns), name
    for _, record in table.iterrows():
        conversations = jobs[record.job]["results"]["per_conversation"]
        for name in ("ref_ppl", "ref_nll", "speak_auc", "avg_cache_size"):
            expected = interval(conversations, name)
            assert record[f"{name}_low"] == pytest.approx(expected["low"]) and record[f"{name}_high"] == pytest.approx(expected["high"])

    # results.json written before runs recorded `intervals` gets the same intervals
    copy = copy_of(tiny["sweep"], tmp_path)
    for path in copy.glob("*/results.json"):
        document = json.loads(path.read_text())
        assert "intervals" in document
        del document["intervals"]
        path.write_text(json.dumps(document))
    old = write_summary(copy, baseline=None)
    new = write_summary(tiny["sweep"], baseline=None)
    assert [r["intervals"] for r in old["rows"]] == [r["intervals"] for r in new["rows"]]


def baseline_of_each_row(markdown: str) -> dict[str, str]:
    """{row's jobs: its baseline cell} of the paired-differences table."""
    return {cells["jobs"]: cells["baseline"] for cells in tables(markdown)[1]}


def number_of(jobs: dict[int, dict], strategy: str, keep: str) -> int:
    return next(n for n, job in jobs.items() if job["overrides"]["strategy"] == strategy
                and job["overrides"]["strategy.last_keep_len"] == keep)


def test_default_baseline_is_the_drop_middle_row_with_the_same_last_keep_len(tiny):
    jobs, markdown = tiny["jobs"], tiny["markdown"]
    baselines = baseline_of_each_row(markdown)
    for keep in ("64", "128"):
        dm = number_of(jobs, "drop_middle", keep)
        assert baselines[str(dm)] == "this row"
        assert baselines[str(number_of(jobs, "streaming_llm", keep))] == f"jobs {dm} (strategy=drop_middle strategy.last_keep_len={keep})"
    # strategy=none ignores last_keep_len: one row over both values, compared with the first matching drop_middle row
    none_row = " ".join(str(n) for n, job in jobs.items() if job["overrides"]["strategy"] == "none")
    first = number_of(jobs, "drop_middle", "64")
    cell = baselines[none_row]
    assert cell.startswith(f"jobs {first} (strategy=drop_middle strategy.last_keep_len=64) ")
    assert footnote_of(cell, differences_part(markdown)).startswith("the first of the 2 drop_middle rows matching its strategy.last_keep_len")
    for cells in tables(markdown)[1]:
        diffs = [cells[f"diff_{name}"] for name in DIFFERENCE_METRICS]
        assert (diffs == ["baseline"] * len(diffs)) == (cells["baseline"] == "this row"), cells


def test_baseline_by_strategy_and_by_job_number(tiny, tmp_path):
    copy = copy_of(tiny["sweep"], tmp_path)
    jobs = tiny["jobs"]
    by_strategy = write_summary(copy, baseline="streaming_llm")
    rows = {row["jobs"]: row for row in by_strategy["rows"]}
    for keep in ("64", "128"):
        sl = str(number_of(jobs, "streaming_llm", keep))
        assert rows[sl]["is_baseline"] and rows[str(number_of(jobs, "drop_middle", keep))]["baseline_jobs"] == sl
    assert "(summary.baseline=streaming_llm)" in (copy / "summary.md").read_text()

    number = number_of(jobs, "drop_middle", "128")
    by_number = write_summary(copy, baseline=number)
    assert {row["baseline_jobs"] for row in by_number["rows"]} == {str(number)}
    assert [row["jobs"] for row in by_number["rows"] if row["is_baseline"]] == [str(number)]
    markdown = (copy / "summary.md").read_text()
    assert f"Baseline: job {number} for every row (summary.baseline={number})" in markdown
    table = pd.read_csv(copy / "summary.csv")
    assert (table.diff_note[table.job == number] == "baseline").all() and table.baseline.str.startswith(f"jobs {number} ").all()

    cli = report(copy, "--baseline", "streaming_llm")
    assert cli.returncode == 0, cli.stderr
    assert "(summary.baseline=streaming_llm)" in cli.stdout


def test_excludes_zero_mark_is_the_intervals_own_result(tiny, tmp_path):
    copy = copy_of(tiny["sweep"], tmp_path)
    jobs = tiny["jobs"]
    summary = write_summary(copy, baseline=None)
    markdown = (copy / "summary.md").read_text()
    differences = {cells["jobs"]: cells for cells in tables(markdown)[1]}
    table = pd.read_csv(copy / "summary.csv").set_index("job")
    compared = 0
    for row in summary["rows"]:
        if row["is_baseline"]:
            continue
        mine, theirs = computed(jobs, row["jobs"]), computed(jobs, row["baseline_jobs"])
        for name in DIFFERENCE_METRICS:
            expected = paired_difference(mine["per_conversation"], theirs["per_conversation"], name)
            cell = differences[row["jobs"]][f"diff_{name}"]
            assert cell.endswith(" *") == expected["excludes_zero"], (row["jobs"], name, cell, expected)
            assert cell.startswith(number_text(expected["difference"], signed=True))
            for number in map(int, row["jobs"].split()):
                record = table.loc[number]
                assert bool(record[f"diff_{name}_excludes_zero"]) == expected["excludes_zero"]
                assert record[f"diff_{name}"] == pytest.approx(expected["difference"])
                assert (record[f"diff_{name}_low"], record[f"diff_{name}_high"]) == pytest.approx((expected["low"], expected["high"]))
            compared += 1
    assert compared == 3 * len(DIFFERENCE_METRICS)  # none, streaming_llm x 2 against their drop_middle rows
    assert table[[f"diff_{name}_excludes_zero" for name in DIFFERENCE_METRICS]].dtypes.eq(bool).all()


def test_report_rejects_a_baseline_naming_no_job_in_one_line(tiny, tmp_path):
    copy = copy_of(tiny["sweep"], tmp_path)
    before = (copy / "summary.md").read_bytes()
    listing = ", ".join(f"{n} ({job_label(job['overrides'])})" for n, job in tiny["jobs"].items())
    bad = report(copy, "--baseline", "foo")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        f"prospect.report: error: --baseline=foo: no job of this sweep has strategy foo or number foo; jobs: {listing}"]
    number = report(copy, "--baseline", "17")
    assert number.returncode == 2
    assert number.stderr.strip().splitlines() == [f"prospect.report: error: --baseline=17: no job of this sweep has number 17; jobs: {listing}"]
    assert (copy / "summary.md").read_bytes() == before  # nothing written
    # without --baseline: summary.baseline of multirun.yaml (snapkv, no job here) gives way to the default, with a note
    default = report(copy)
    assert default.returncode == 0, default.stderr
    assert "note: summary.baseline=snapkv of multirun.yaml: no job of this sweep has strategy snapkv" in default.stdout
    assert "(summary.baseline=null)" in default.stdout


def test_ref_nll_by_turn_has_one_line_per_distinct_job(tiny):
    sweep, jobs = tiny["sweep"], tiny["jobs"]
    assert (sweep / "ref_nll_by_turn.png").is_file()
    rows = distinct_rows(collect_jobs(sweep))
    figure = ref_nll_by_turn_figure(rows, Overrides.of(collect_jobs(sweep)))
    (axis,) = figure.axes
    job_lines = [line for line in axis.get_lines() if not line.get_label().startswith("_")]
    reduction_lines = [line for line in axis.get_lines() if line.get_label() == "_first reduction"]
    summary = write_summary(sweep, baseline=None)
    assert len(job_lines) == len(summary["rows"]) == 5
    reduced, most_turns = 0, 0
    for line, row in zip(job_lines, summary["rows"]):
        assert line.get_label().startswith(row["legend"] + " (2 conv., ")
        records = [json.loads(text) for text in (jobs[int(row["jobs"].split()[0])]["folder"] / "trace.jsonl").read_text().splitlines()]
        turns = {}
        for record in records:
            if "ref_nll" in record:
                turns.setdefault(record["conversation"], []).append(record["ref_nll"] / record["ref_tokens"])
        assert len(turns) == 2
        expected = [statistics.fmean(t[k] for t in turns.values() if len(t) > k) for k in range(max(map(len, turns.values())))]
        assert list(line.get_xdata()) == list(range(1, len(expected) + 1))
        assert list(line.get_ydata()) == pytest.approx(expected)
        reduced += any(set(record.get("events", [])) & set(REDUCTION_EVENTS) for record in records)
        most_turns = max(most_turns, len(expected))
    assert len(reduction_lines) == reduced >= 3  # none resets, drop_middle and streaming_llm compress
    assert all(0 < line.get_xdata()[0] < most_turns + 1 for line in reduction_lines)


def test_pareto_shows_f1_and_perplexity_against_memory_with_intervals(tiny):
    summary = write_summary(tiny["sweep"], baseline=None)
    figure = pareto_figure(summary["rows"])
    assert [(a.get_xlabel(), a.get_ylabel()) for a in figure.axes] == [
        ("peak KV-cache memory (MB)", "F1 (higher is better)"),
        ("peak KV-cache memory (MB)", "reference perplexity, teacher-forced (lower is better)"),
        ("time per frame (s)", "F1 (higher is better)")]
    for axis, name in zip(figure.axes, ("f1", "ref_ppl", "f1")):
        from matplotlib.collections import LineCollection

        bars = [segment for c in axis.collections if isinstance(c, LineCollection) and c.get_label() == "_interval"
                for segment in c.get_segments()]
        expected = sorted((row[f"{name}_low"], row[f"{name}_high"]) for row in summary["rows"] if row.get(f"{name}_low") is not None)
        assert len(expected) == 5  # each bar spans exactly its job's interval
        drawn = sorted((float(seg[0][1]), float(seg[1][1])) for seg in bars)
        assert np.allclose(drawn, expected)


def test_jobs_over_different_conversations_are_not_paired(oracle, tmp_path):
    jobs, markdown = oracle["jobs"], oracle["markdown"]
    assert "Baseline: job 1 for every row (summary.baseline=1)" in markdown  # read from the sweep's config
    assert len(jobs[1]["results"]["per_conversation"]) == 2
    differences = {cells["jobs"]: cells for cells in tables(markdown)[1]}
    table = pd.read_csv(oracle["sweep"] / "summary.csv").set_index("job")
    for number, job in jobs.items():
        if number == 1:
            assert differences["1"]["diff_f1"] == "baseline"
            continue
        expected = paired_difference(job["results"]["per_conversation"], jobs[1]["results"]["per_conversation"], "f1")
        cell = differences[str(number)]["diff_f1"]
        if job["overrides"]["dataset.max_videos"] == "1":
            assert expected["reason"].startswith("not paired")
            assert cell.startswith("not paired ") and footnote_of(cell, differences_part(markdown)) == expected["reason"]
            assert pd.isna(table.loc[number, "diff_f1"]) and expected["reason"] in table.loc[number, "diff_note"]
        else:
            assert "[" in cell and table.loc[number, "diff_f1"] == pytest.approx(expected["difference"])
    copy = copy_of(oracle["sweep"], tmp_path)
    assert write_summary(copy)["baseline"] == 1  # summary.baseline of multirun.yaml


def test_one_conversation_gives_no_interval_and_says_why(oracle, tmp_path):
    jobs, markdown = oracle["jobs"], oracle["markdown"]
    metric_rows = {cells["jobs"]: cells for cells in tables(markdown)[0]}
    table = pd.read_csv(oracle["sweep"] / "summary.csv").set_index("job")
    for number, job in jobs.items():
        conversations = job["results"]["per_conversation"]
        cell = metric_rows[str(number)]["f1"]
        expected = interval(conversations, "f1")
        if len(conversations) == 1:
            assert cell == f"{number_text(job['results']['metrics']['f1'])} {cell.split()[-1]}"
            assert footnote_of(cell, markdown.split("## Paired")[0]) == expected["reason"]
            assert pd.isna(table.loc[number, "f1_low"]) and expected["reason"] in table.loc[number, "intervals_note"]
        else:
            assert cell.endswith(f"[{number_text(expected['low'])}, {number_text(expected['high'])}]")
    # the default rule pairs each job with the drop_middle job of its max_videos: one conversation, no interval
    copy = copy_of(oracle["sweep"], tmp_path)
    summary = write_summary(copy, baseline=None)
    one = next(row for row in summary["rows"] if row["values"] == {"strategy": ["none"], "dataset.max_videos": ["1"]})
    assert one["baseline"] == "jobs 0 (strategy=drop_middle dataset.max_videos=1)"
    assert one["differences"]["f1"]["reason"].startswith("one conversation") and "low" not in one["differences"]["f1"]


@pytest.mark.parametrize("argv,expected", [
    (["summary.baseline=foo"], "summary.baseline=foo: must be null, a job number >= 0 or a strategy: drop_all, drop_frames, drop_middle"),
    (["summary.baseline=-1"], "summary.baseline=-1: must be >= 0 (a job number)"),
    (["summary.baseline=true"], "summary.baseline=true: must be null, a job number >= 0 or a strategy"),
    (["summary.baseline=1.5"], "summary.baseline=1.5: must be null, a job number >= 0 or a strategy"),
    (["+summary.colour=red"], "summary.colour: unknown key; summary has: baseline"),
    (["summary.colour=red"], "summary.colour=red: unknown key; summary has: baseline"),
    (["-m", "strategy=none,drop_all", "summary.baseline=drop_midle"], "summary.baseline=drop_midle: must be null"),
])
def test_bad_summary_config_fails_in_one_line(argv, expected):
    with pytest.raises(ConfigError) as raised:
        check_command_line(argv)
    assert expected in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("value", ["null", "0", "7", "snapkv", "drop_middle", "none"])
def test_good_summary_baselines_pass(value):
    check_command_line([f"summary.baseline={value}"])
