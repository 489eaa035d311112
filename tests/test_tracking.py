"""Tracking with real components: a real offline W&B run read back from its `.wandb` log, W&B failures that
never fail a run, the cache-size PNG and the self-contained timeline.html. Nothing reaches the network."""

from __future__ import annotations

import html
import json
import logging
import struct
import zlib
from pathlib import Path

import pytest
from conftest import compose

from prospect.tracking import reductions
from prospect.tracking.plots import cache_curve, plot_cache_sizes
from prospect.tracking.timeline import write_timeline
from prospect.tracking.wandb_mirror import WandbMirror, api_key_configured, history_row
from prospect.tracking.wandb_records import iter_payloads, read_wandb_records, summarize_records

MIRROR_LOGGER = "prospect.tracking.wandb_mirror"
LOGGER_CFG = {
    "name": "wandb", "mode": None, "project": "prospect", "entity": None, "group": "sweep-7", "tags": ["test", "drop_middle"], "job_name": None,
}


# ---- inputs shaped as stream/runner.py and experiment.py write them ----------------------------------


def make_trace() -> list[dict]:
    """Two conversations of 12 frames at 2 fps: 80 tokens a frame, a reduction when over 500 tokens
    (compressions in the first, a reset then a summary in the second), a reply every 4th frame."""
    records = []
    for conversation, kinds in (("video-a/0", ["compress", "compress"]), ("video-b/1", ["reset", "summary"])):
        length = 40
        for index in range(12):
            record = {"conversation": conversation, "index": index, "time": index * 0.5, "cache_before": length, "events": ["frame"]}
            length += 80
            if index % 4 == 3:
                record["events"].append("speak")
                record["reply"] = f"step {index} of {conversation}"
                length += 12
            record["generated_tokens"] = 12 if "speak" in record["events"] else 0
            if length > 500:
                event = kinds.pop(0) if kinds else "compress"
                after = 40 if event == "reset" else 200
                record["events"].append(event)
                record["reductions"] = [{"before": length, "after": after}]
                if event == "summary":
                    record["summary"] = "They <cut> the onions & \"stir\"."
                length = after
            record.update(chunk_tokens=80, cache_max=max(r["before"] for r in record.get("reductions", [{"before": length}])))
            record.update(cache_after=length, next_position=1000 + index, pending_tokens=0)
            record.update(vision_ms=3.0, prefill_ms=5.0, decode_ms=1.0, reduce_ms=0.5, wall_ms=9.5 + index)
            records.append(record)
    return records


def make_predictions() -> dict:
    frames_a = [
        {"index": 3, "time": 1.5, "gen": "Take the <knife> & cut.", "ref": "Now cut the \"onion\"."},
        {"index": 7, "time": 3.5, "gen": "Stir it.", "ref": ""},
        {"index": 9, "time": 4.5, "gen": "", "ref": "Add salt <b>now</b>."},
    ]
    frames_b = [{"index": 3, "time": 1.5, "gen": "Open the lid.", "ref": "Lift the lid."}]
    conversations = [
        {"id": "video-a/0", "video_uid": "va", "subset": "ego4d", "user_type": "no_talk", "fps": 2.0, "num_frames": 12, "frames": frames_a},
        {"id": "video-b/1", "video_uid": "vb", "subset": "ego4d", "user_type": "talk_some", "fps": 2.0, "num_frames": 12, "frames": frames_b},
    ]
    return {"schema": "prospect.predictions/1", "conversations": conversations}


@pytest.fixture
def wandb_env(tmp_path, monkeypatch) -> Path:
    """W&B confined to tmp_path: offline, silent, no key, a HOME without .netrc, an unreachable server URL."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # if anything tried the network, it would fail here
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text('{"status": "ok"}\n')
    return run_dir


def wandb_log_of(run_dir: Path, wait_s: float = 15.0) -> dict:
    """The run's records as W&B wrote them. W&B's service process writes the log asynchronously: after
    `finish()` returns in this process, its last records (the exit record) can land a moment later, so read
    again until the exit record is there (or wait_s passed)."""
    import time

    logs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    deadline = time.monotonic() + wait_s
    while True:
        logged = summarize_records(read_wandb_records(logs[0]))
        if logged.get("exit_code") is not None or time.monotonic() > deadline:
            return logged
        time.sleep(0.2)


def mirror_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == MIRROR_LOGGER and r.levelno >= logging.WARNING]


# ---- the W&B mirror and the reader ----------------------------------------------------------------------


def test_offline_run_round_trips_through_the_wandb_log(wandb_env, caplog):
    trace, predictions = make_trace(), make_predictions()
    config = {"seed": 0, "strategy": {"name": "drop_middle", "max_seq_len": 512}}
    mirror = WandbMirror()
    mirror.start(LOGGER_CFG, wandb_env, config, name="drop_middle-seed0")
    assert mirror.active
    mirror.log_trace(trace[:12])  # one call per conversation, as the run loop writes them
    mirror.log_trace(trace[12:])
    mirror.finish({"f1": 0.625, "frames": len(trace)}, predictions, exit_code=0)
    mirror.finish({"f1": 0.0}, None, exit_code=1)  # idempotent: nothing more is written
    assert not mirror.active and mirror_warnings(caplog) == []

    logged = wandb_log_of(wandb_env)
    assert logged["run"]["name"] == "drop_middle-seed0" and logged["run"]["group"] == "sweep-7"
    assert logged["run"]["tags"] == ["test", "drop_middle"] and logged["run"]["project"] == "prospect"
    assert logged["config"]["seed"] == 0 and logged["config"]["strategy"] == config["strategy"]
    frames = [row for row in logged["history"] if "cache_length" in row["items"]]
    assert [row["step"] for row in frames] == list(range(len(trace)))  # global frame index across conversations
    assert [row["items"]["cache_length"] for row in frames] == [r["cache_after"] for r in trace]
    assert [row["items"]["frame_ms"] for row in frames] == [r["wall_ms"] for r in trace]
    for event in ("compress", "reset", "summary", "speak"):
        assert sum(row["items"][event] for row in frames) == sum(event in r["events"] for r in trace), event
    assert logged["summary"]["f1"] == 0.625 and logged["summary"]["frames"] == len(trace)
    assert logged["summary"]["predictions.nrows"] == 4 and logged["summary"]["predictions.ncols"] == 5
    assert logged["exit_code"] == 0

    table_file = next((wandb_env / "wandb").glob("offline-run-*/files/media/table/predictions_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["conversation", "index", "time", "gen", "ref"]
    assert table["data"][0] == ["video-a/0", 3, 1.5, "Take the <knife> & cut.", "Now cut the \"onion\"."]
    assert (wandb_env / "results.json").read_text() == '{"status": "ok"}\n'


def test_no_mode_and_no_api_key_logs_offline_with_one_warning(wandb_env, monkeypatch, caplog):
    cfg = compose("logger=wandb", "logger.group=sweep-3", "logger.tags=[a,b]", "seed=1")  # conf/logger/wandb.yaml: mode null
    monkeypatch.delenv("WANDB_MODE")
    assert cfg.logger.mode is None and not api_key_configured()
    mirror = WandbMirror()
    mirror.start(cfg.logger, wandb_env, cfg, name="job-1")  # DictConfigs are accepted
    mirror.log_trace(make_trace()[:3])
    mirror.finish({"f1": 0.5}, None, exit_code=2)
    warnings = mirror_warnings(caplog)
    assert len(warnings) == 1 and warnings[0].startswith("no W&B API key: logging offline to ")
    assert "`wandb sync " + str(wandb_env / "wandb" / "offline-run-") in warnings[0]
    logged = wandb_log_of(wandb_env)
    assert logged["exit_code"] == 2 and logged["summary"]["f1"] == 0.5
    assert logged["config"]["seed"] == 1 and logged["config"]["strategy"]["name"] == cfg.strategy.name
    assert (logged["run"]["group"], logged["run"]["tags"], logged["run"]["name"]) == ("sweep-3", ["a", "b"], "job-1")


def test_api_key_from_env_or_netrc(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    assert not api_key_configured()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc123\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert api_key_configured()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not api_key_configured()
    monkeypatch.setenv("WANDB_API_KEY", "abc123")
    assert api_key_configured()


def test_wandb_errors_never_fail_the_run(wandb_env, monkeypatch, caplog):
    import wandb

    trace = make_trace()
    # an invalid setting: wandb.init raises, the mirror warns once and stays off
    mirror = WandbMirror()
    mirror.start({**LOGGER_CFG, "mode": "bogus"}, wandb_env, {}, "job")
    mirror.log_trace(trace)
    mirror.finish({"f1": 1.0}, make_predictions(), exit_code=0)
    warnings = mirror_warnings(caplog)
    assert not mirror.active and len(warnings) == 1 and "wandb.init failed" in warnings[0] and "\n" not in warnings[0]

    # wandb.init itself raising (no network, a broken install...)
    caplog.clear()

    def broken_init(**kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    mirror = WandbMirror()
    mirror.start(LOGGER_CFG, wandb_env, {}, "job")
    mirror.log_trace(trace)
    mirror.finish({"f1": 1.0}, make_predictions(), exit_code=0)
    assert len(mirror_warnings(caplog)) == 1 and "ConnectionError: api.wandb.ai unreachable" in mirror_warnings(caplog)[0]
    monkeypatch.undo()
    assert (wandb_env / "results.json").read_text() == '{"status": "ok"}\n'


def test_an_error_mid_run_disables_the_mirror_and_closes_the_run(wandb_env, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    mirror = WandbMirror()
    mirror.start(LOGGER_CFG, wandb_env, {"seed": 0}, "job")
    run = mirror.run
    calls = []

    def failing_log(*args, **kwargs):
        calls.append(args)
        raise OSError("disk full")

    monkeypatch.setattr(run, "log", failing_log)
    mirror.log_trace(make_trace())
    mirror.log_trace(make_trace())  # off: not even attempted
    mirror.finish({"f1": 1.0}, make_predictions(), exit_code=0)
    assert len(calls) == 1 and not mirror.active
    assert len(mirror_warnings(caplog)) == 1 and "OSError: disk full" in mirror_warnings(caplog)[0]
    assert wandb_log_of(wandb_env)["exit_code"] == 1  # closed, so the next job cannot land in it


def test_logger_none_does_nothing(wandb_env, caplog):
    mirror = WandbMirror()
    mirror.start({"name": "none"}, wandb_env, {}, "job")
    mirror.log_trace(make_trace())
    mirror.finish({"f1": 1.0}, make_predictions(), exit_code=0)
    assert not (wandb_env / "wandb").exists() and mirror_warnings(caplog) == []


def test_history_row_of_a_trace_record():
    record = next(r for r in make_trace() if "summary" in r["events"])
    row = history_row(record)
    assert row["cache_length"] == record["cache_after"] and row["frame_ms"] == record["wall_ms"]
    assert (row["summary"], row["compress"], row["reset"]) == (1, 0, 0)
    assert row["tokens_dropped"] == record["reductions"][0]["before"] - record["reductions"][0]["after"]
    assert row["cache_max"] == record["reductions"][0]["before"]
    time = record["time"]
    assert cache_curve([record]) == [(time, record["reductions"][0]["before"]), (time, record["cache_after"])]  # the drop


def write_log(payloads: list[bytes]) -> bytes:
    """An independent writer of the `.wandb` framing (header, 32 KiB blocks, split records, padding)."""
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for payload in payloads:
        first = True
        while True:
            left = 32768 - len(out) % 32768
            if left < 7:
                out += bytes(left)
                continue
            chunk, payload = payload[: left - 7], payload[left - 7 :]
            kind = (1 if not payload else 2) if first else (4 if not payload else 3)
            out += struct.pack("<IHB", zlib.crc32(bytes([kind]) + chunk), len(chunk), kind) + chunk
            first = False
            if not payload:
                break
    return bytes(out)


def test_reader_framing_padding_split_records_and_corruption(tmp_path):
    # 7 + (7 + 32751) leaves 3 bytes of padding in the first block; the second payload spans three blocks
    payloads = [b"a" * 32751, bytes(range(256)) * 300, b"c" * 5]
    data = write_log(payloads)
    assert list(iter_payloads(data)) == payloads
    corrupted = bytearray(data)
    corrupted[40000] ^= 0xFF
    with pytest.raises(ValueError, match="checksum mismatch"):
        list(iter_payloads(bytes(corrupted)))
    with pytest.raises(ValueError, match="ends inside a split record|truncated"):
        list(iter_payloads(data[:50000]))
    with pytest.raises(ValueError, match="not a W&B log"):
        list(iter_payloads(b"LEVELDB" + data[7:]))
    path = tmp_path / "broken.wandb"
    path.write_bytes(data[:20])
    with pytest.raises(ValueError, match="broken.wandb"):
        read_wandb_records(path)


# ---- plot and timeline -----------------------------------------------------------------------------


def test_cache_plot_is_a_png(tmp_path):
    path = plot_cache_sizes(tmp_path / "cache.png", make_trace(), "drop_middle, max_seq_len 512", max_seq_len=512)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 400 and len(data) > 20_000


def test_timeline_is_self_contained_and_shows_every_text(tmp_path):
    trace, predictions = make_trace(), make_predictions()
    path = write_timeline(tmp_path / "timeline.html", predictions, trace, "run <drop_middle> & co", max_seq_len=512)
    page = path.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page and "<script" not in page.lower()
    assert "<link" not in page.lower() and "@import" not in page
    assert "<h1>run &lt;drop_middle&gt; &amp; co</h1>" in page
    for conversation in predictions["conversations"]:
        for frame in conversation["frames"]:
            for text in (frame["gen"], frame["ref"]):
                if text:
                    assert html.escape(text) in page, text
    assert "<knife>" not in page and "<b>now</b>" not in page and "<cut>" not in page
    assert html.escape("They <cut> the onions & \"stir\".") in page  # the summary text, on hover
    for event in ("compress", "reset", "summary"):
        expected = sum(1 for r in trace for e, _, _ in reductions(r) if e == event)
        assert expected >= 1 and page.count(f'<g class="reduction {event}">') == expected, event
    assert page.count('class="turn ref"') == 3 and page.count('class="turn gen"') == 3
    assert len(page) < 100_000
