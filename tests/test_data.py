"""ProAssist-format loader (real samples, error cases) and the synthetic generator."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REFERENCE_SAMPLES, REPO, compose
from prospect.data import load_dataset
from prospect.data.frames import FRAME_COLUMN, FrameError, encode_jpeg
from prospect.data.proassist import DatasetError, conversation_from_sample, load_conversations
from prospect.data.synthetic import USER_NAMES, draw_frame, generate, plan_video


def write_frames(path: Path, count: int, corrupt: set[int] = frozenset()) -> None:
    """An arrow frames file like ProAssist's (ArrowWriter, column `frame`, base64 JPEG)."""
    import random

    from datasets.arrow_writer import ArrowWriter

    plan = plan_video(0, 60, 2, random.Random(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    with ArrowWriter(path=str(path)) as writer:
        for i in range(count):
            writer.write({FRAME_COLUMN: "not*base64!" if i in corrupt else encode_jpeg(draw_frame(plan, i % plan.num_frames))})
        writer.finalize()


@pytest.fixture
def real_format_root(tmp_path) -> Path:
    """The two real ProAssist samples with generated stand-in frames files (the real ones are not available)."""
    if not REFERENCE_SAMPLES.is_file():
        pytest.skip(f"{REFERENCE_SAMPLES} not available")
    subset = tmp_path / "processed_data" / "assembly101"
    (subset / "prepared").mkdir(parents=True)
    shutil.copy(REFERENCE_SAMPLES, subset / "prepared" / "dialog_val_L0_I1.jsonl")
    sample = json.loads(REFERENCE_SAMPLES.read_text().splitlines()[0])
    write_frames(subset / sample["frames_file"], 360)
    return tmp_path


def test_real_samples_give_proassist_streams(real_format_root):
    loaded = load_conversations(real_format_root, "assembly101", "dialog_val_L0_I1")
    assert loaded.skipped == []
    assert [c.user_type for c in loaded.conversations] == ["no_talk", "talk_some"]
    assert [c.num_frames for c in loaded.conversations] == [331, 338]
    assert [len(c.references) for c in loaded.conversations] == [20, 20]
    first = loaded.conversations[0]
    assert first.subset == "assembly101" and first.fps == 2.0
    assert first.system_prompt.startswith("You are a proactive assistant.")
    # frames 11..14, then the user turn is fed before frame 15 (stream index 4), whose reference follows it
    frame = first.frames[4]
    assert (frame.index, frame.original_index, frame.time) == (4, 15, 2.5)
    assert [t.role for t in frame.turns_before] == ["user"]
    assert frame.reference.startswith("Great goal! Let's get started.")
    assert first.frames[0].turns_before == () and first.frames[0].reference is None
    # a reference sits on the last frame of a frames turn followed by an assistant turn (end exclusive)
    assert first.frames[341 - 11].reference.startswith("Excellent, the water tank is now detached!")
    assert first.image(4).size == (384, 384)


def test_conversations_are_never_pooled(real_format_root):
    loaded = load_conversations(real_format_root, "assembly101", "dialog_val_L0_I1")
    ids = [c.id for c in loaded.conversations]
    assert len(set(ids)) == 2 and all(c.video_uid == loaded.conversations[0].video_uid for c in loaded.conversations)


def _write_annotation(root: Path, lines: list[str], name: str = "dialog_test_L0_I1") -> None:
    path = root / "processed_data" / "synthetic" / "prepared" / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")


def test_bad_samples_are_skipped_and_named(synthetic_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    good = (root / "processed_data/synthetic/prepared/dialog_test_L0_I1.jsonl").read_text().splitlines()
    missing_frames = json.loads(good[0]) | {"frames_file": "frames/nope.arrow", "video_uid": "ghost"}
    past_end = json.loads(good[2]) | {"end_frame_idx": 10_000}
    _write_annotation(root, [good[0], "{not json", json.dumps(missing_frames), json.dumps(past_end), good[1]])
    loaded = load_conversations(root, "synthetic", "dialog_test_L0_I1")
    assert [c.id for c in loaded.conversations] == ["synthetic_000/0/no_talk_0", "synthetic_000/0/talk_some_1"]
    reasons = [s.reason for s in loaded.skipped]
    assert len(reasons) == 3
    assert "dialog_test_L0_I1.jsonl:2: malformed JSON" in reasons[0]
    assert "frames/nope.arrow: frames file missing (video ghost)" in reasons[1]
    assert "video synthetic_001: end_frame_idx 10000 past the video" in reasons[2] and "has 60 frames" in reasons[2]



def test_duplicate_samples_load_once_and_ids_stay_unique(synthetic_root, tmp_path, caplog):
    """The same sample twice (concatenated splits): the copy is skipped, naming the first line. A different sample
    with the same (video_uid, clip_idx, user id) is kept under a distinct id `ID#lineN`, with a warning."""
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    path = root / "processed_data/synthetic/prepared/dialog_test_L0_I1.jsonl"
    good = path.read_text().splitlines()
    same_id = json.loads(good[0])
    same_id["conversation"] = same_id["conversation"][:-1]  # another sample of the same video, clip and user
    reordered = json.dumps(json.loads(good[0]), indent=None, separators=(", ", ":"), sort_keys=True)  # same JSON object
    _write_annotation(root, [good[0], good[1], good[0], reordered, json.dumps(same_id), json.dumps(same_id), good[2]])
    with caplog.at_level("WARNING", logger="prospect.data.proassist"):
        loaded = load_conversations(root, "synthetic", "dialog_test_L0_I1")
    ids = [c.id for c in loaded.conversations]
    assert ids == ["synthetic_000/0/no_talk_0", "synthetic_000/0/talk_some_1", "synthetic_000/0/no_talk_0#line5",
                   "synthetic_001/0/no_talk_0"]
    assert len(set(ids)) == len(ids)
    assert [(s.line, s.reason) for s in loaded.skipped] == [
        (3, f"{path}:3: duplicate of line 1, skipped"), (4, f"{path}:4: duplicate of line 1, skipped"),
        (6, f"{path}:6: duplicate of line 5, skipped"),
    ]
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{path}:5: video synthetic_000: id synthetic_000/0/no_talk_0 also names line 1, whose sample differs; " \
           "this one is streamed as synthetic_000/0/no_talk_0#line5" in messages
    references = lambda conversation: [(f.index, f.reference) for f in conversation.frames]  # noqa: E731
    other = conversation_from_sample(same_id, root / "processed_data" / "synthetic")  # the renamed one is the other sample
    assert references(loaded.conversations[2]) == references(other) != references(loaded.conversations[0])


def test_distinct_ids_hold_whatever_the_filters_and_never_collide(synthetic_root, tmp_path):
    """The ids are settled over the whole file: a filter that drops the first of two samples sharing an id leaves
    the second its `#lineN` id; an id the file already uses (even one ending in #lineN) is never given twice."""
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    good = (root / "processed_data/synthetic/prepared/dialog_test_L0_I1.jsonl").read_text().splitlines()
    first = json.loads(good[0])
    other_type = json.loads(good[0])
    other_type["metadata"]["user_type"] = "talk_some"  # same video, clip and user id; another user type
    squatter = json.loads(good[1])
    squatter["metadata"]["user_id"] = first["metadata"]["user_id"] + "#line3"  # already holds the id line 3 would get
    _write_annotation(root, [json.dumps(squatter), good[0], json.dumps(other_type)])
    everything = [(c.id, c.user_type) for c in load_conversations(root, "synthetic", "dialog_test_L0_I1").conversations]
    base = f"synthetic_000/0/{first['metadata']['user_id']}"
    assert everything == [(f"{base}#line3", "talk_some"), (base, first["metadata"]["user_type"]), (f"{base}#line3-2", "talk_some")]
    assert len({i for i, _ in everything}) == 3
    only = load_conversations(root, "synthetic", "dialog_test_L0_I1", user_types=["talk_some"]).conversations
    assert [c.id for c in only] == [f"{base}#line3", f"{base}#line3-2"]  # as unfiltered: the id names one sample


def test_every_loader_path_gives_unique_ids(synthetic_root):
    """The batch API (BaselineGenerator) takes LoadedDatasets, Conversations or the seed's video dicts: a repeated
    id becomes `ID#N`, so predictions.json never holds one id twice."""
    from prospect.generators import _conversations

    loaded = load_conversations(synthetic_root, "synthetic", "dialog_test_L0_I1")
    first = loaded.conversations[0]
    image = first.image(0)
    video = {"video_id": "v", "frames": [image, image, image], "fps": 1.0,
             "conversation": [{"role": "user", "content": "Hi", "time": 0.0}, {"role": "assistant", "content": "Hello", "time": 1.0}]}
    for dataset in ([first, first, loaded.conversations[1]], [video, video, video | {"user_type": "talk_some"}, video]):
        ids = [c.id for c in _conversations(dataset)]
        assert len(set(ids)) == len(ids) == len(dataset)
        assert ids[1] == ids[0] + "#2"
    assert [c.id for c in _conversations([video, video, video])][2] == "v/0/unknown#3"
    named = [video | {"user_type": "unknown#2"}, video, video]  # the list already holds the id a repeat would get
    assert [c.id for c in _conversations(named)] == ["v/0/unknown#2", "v/0/unknown", "v/0/unknown#3"]
    assert [c.id for c in _conversations(loaded)] == [c.id for c in loaded.conversations]


def test_hostile_lines_are_skipped_once_each(synthetic_root, tmp_path, caplog):
    """Lines not UTF-8, not an object, missing or mistyped fields: one warning each naming file:line; the rest load."""
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    path = root / "processed_data/synthetic/prepared/dialog_test_L0_I1.jsonl"
    good = path.read_bytes().splitlines()
    sample = json.loads(good[2])
    latin1 = good[1].replace(b"Assembling", b"Assembl\xe9", 1)  # a latin-1 byte inside a sample: its video is known
    assert latin1 != good[1]
    offset = latin1.index(b"\xe9")
    lines = [
        b"\xef\xbb\xbf" + good[0],  # 1: a byte-order mark in front is not data: loads
        b"\xff\xfe{\x00\"\x00v\x00",  # 2: UTF-16 bytes
        latin1,  # 3
        b"[1, 2, 3]",  # 4: a JSON list
        b"42",  # 5: a number
        json.dumps({k: v for k, v in sample.items() if k != "conversation"}).encode(),  # 6
        json.dumps(sample | {"conversation": "hello"}).encode(),  # 7
        json.dumps(sample | {"fps": "2", "metadata": "x"}).encode(),  # 8
        json.dumps(sample | {"video_uid": 7}).encode(),  # 9
        b"",  # 10: blank lines are not samples
        good[2],  # 11
        good[3],  # 12
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level("WARNING", logger="prospect.data.proassist"):
        loaded = load_conversations(root, "synthetic", "dialog_test_L0_I1")
    assert [c.id for c in loaded.conversations] == ["synthetic_000/0/no_talk_0", "synthetic_001/0/no_talk_0", "synthetic_001/0/talk_some_1"]
    expected = {
        2: (None, "not UTF-8 text (invalid byte 0xff at byte offset 0)"),
        3: ("synthetic_000", f"video synthetic_000: not UTF-8 text (invalid byte 0xe9 at byte offset {offset})"),
        4: (None, "not a JSON object (got a list)"),
        5: (None, "not a JSON object (got a number)"),
        6: ("synthetic_001", "video synthetic_001: missing field(s) conversation"),
        7: ("synthetic_001", "video synthetic_001: 'conversation' must be a non-empty list of turns, got str"),
        8: ("synthetic_001", "video synthetic_001: fps must be a positive number, got '2'; metadata must be an object, got str"),
        9: (None, "video_uid must be a non-empty string, got 7"),
    }
    assert [(s.line, s.video_uid, s.reason) for s in loaded.skipped] == [
        (n, uid, f"{path}:{n}: {problem}") for n, (uid, problem) in expected.items()
    ]
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert messages == [f"skipped sample: {path}:{n}: {problem}" for n, (_, problem) in expected.items()]
    # filters never crash on a broken line; one of another video is left alone, one of an unknown video reported
    only = load_conversations(root, "synthetic", "dialog_test_L0_I1", video_ids=["synthetic_001"], user_types=["talk_some"])
    assert [c.id for c in only.conversations] == ["synthetic_001/0/talk_some_1"]
    assert [s.line for s in only.skipped] == [2, 4, 5, 6, 7, 8, 9]

def test_bad_base64_fails_when_the_stream_reaches_it(synthetic_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    write_frames(root / "processed_data/synthetic/frames/synthetic_000.arrow", 60, corrupt={7})
    loaded = load_conversations(root, "synthetic", "dialog_test_L0_I1")
    assert len(loaded.conversations) == 4  # decoding is lazy: loading still succeeds
    conversation = loaded.conversations[0]
    conversation.image(0)
    k = next(f.index for f in conversation.frames if f.original_index == 7)
    with pytest.raises(FrameError, match=r"synthetic_000.arrow: frame 7 of video synthetic_000: not a base64 JPEG"):
        conversation.image(k)


def test_missing_annotation_lists_available(synthetic_root):
    with pytest.raises(DatasetError, match=r"dialog_val_L0_I1.jsonl: annotation file missing .*dialog-klg_test_L0_I1, dialog_test_L0_I1"):
        load_conversations(synthetic_root, "synthetic", "dialog_val_L0_I1")


def test_video_filter_and_max_videos(synthetic_root):
    only = load_conversations(synthetic_root, "synthetic", "dialog_test_L0_I1", video_ids=["synthetic_001"])
    assert {c.video_uid for c in only.conversations} == {"synthetic_001"} and len(only.conversations) == 2
    first = load_conversations(synthetic_root, "synthetic", "dialog_test_L0_I1", max_videos=1)
    assert [c.user_type for c in first.conversations] == ["no_talk", "talk_some"]
    assert {c.video_uid for c in first.conversations} == {"synthetic_000"}


def test_generator_is_deterministic(tmp_path):
    a, b, c = (generate(tmp_path / name, videos=1, seconds=20, seed=seed, knowledge=True) for name, seed in (("a", 3), ("b", 3), ("c", 4)))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 4  # frames, two annotation files, manifest
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "frames/synthetic_000.arrow").read_bytes() != (c / "frames/synthetic_000.arrow").read_bytes()


def test_named_user_says_a_name_once_after_the_initial_cache_and_later_references_use_it(tmp_path):
    plain = generate(tmp_path / "plain", videos=2, seconds=32, seed=1, knowledge=True)
    named = generate(tmp_path / "named", videos=2, seconds=32, seed=1, knowledge=True, named_user=True)
    assert (plain / "frames/synthetic_001.arrow").read_bytes() == (named / "frames/synthetic_001.arrow").read_bytes()
    for annotation in ("dialog_test_L0_I1", "dialog-klg_test_L0_I1"):
        before = {c.id: c for c in load_conversations(plain.parent.parent, "synthetic", annotation).conversations}
        after = load_conversations(named.parent.parent, "synthetic", annotation).conversations
        assert len(after) == len(before) == 4
        names = set()
        for conversation in after:
            fed = [(f.index, t) for f in conversation.frames for t in f.turns_before]
            statements = [(k, t.content) for k, t in fed if t.role == "user" and any(n in t.content for n in USER_NAMES)]
            assert len(statements) == 1, conversation.id
            (at, text), = statements
            name = next(n for n in USER_NAMES if n in text)
            names.add(name)
            goal_frame = next(k for k, t in fed if t.role == "user")
            assert at == goal_frame + 2  # after the frame of the goal, i.e. after ProAssist's initial cache
            original = before[conversation.id]
            for frame, other in zip(conversation.frames, original.frames):  # the same stream, references renamed
                assert frame.index == other.index and (frame.reference is None) == (other.reference is None)
                if frame.reference is not None and frame.index >= at:
                    assert frame.reference == f"{name}, {other.reference[0].lower()}{other.reference[1:]}"
                elif frame.reference is not None:
                    assert frame.reference == other.reference
        assert len(names) >= 2  # each conversation draws its own name


def test_generated_data_loads_like_real_data(synthetic_root):
    loaded = load_conversations(synthetic_root, "synthetic", "dialog-klg_test_L0_I1")
    assert loaded.skipped == [] and len(loaded.conversations) == 4
    for conversation in loaded.conversations:
        # 60 frames; the clip starts after the 2 empty-bench frames and ends with the final remark
        assert conversation.frames[0].original_index == 2
        assert conversation.num_frames == conversation.frames[-1].original_index - 1 <= 58
        assert conversation.frames[-1].reference is not None
        assert conversation.add_knowledge and conversation.knowledge.count("\n") >= 2
        references = conversation.references
        assert len(references) >= 4
        # the goal statement and the knowledge are fed before the first reference frame
        fed = [t for f in conversation.frames[: references[0].index + 1] for t in f.turns_before]
        assert [t.role for t in fed] == ["user", "system"] and fed[1].content.startswith("Task knowledge: ")
        # instructions name the knowledge's steps in order: predictable only from context
        steps = [line.split(". ", 1)[1].lower() for line in conversation.knowledge.splitlines()[1:]]
        named = [s for r in references for s in steps if s in r.reference.lower()]
        assert named == steps[: len(named)] and len(named) >= 2
        image = conversation.image(references[1].index)
        assert image.size == (384, 384) and image.mode == "RGB"


def test_frames_change_at_step_transitions():
    import random

    plan = plan_video(0, 60, 2, random.Random(1))
    edge = plan.boundaries[2]
    before, after = draw_frame(plan, edge - 1), draw_frame(plan, edge)
    # a part is completed at the transition: more filled pixels of its colour afterwards
    assert before.tobytes() != after.tobytes()


def test_dataset_synthetic_generates_on_first_use(tmp_path):
    cfg = compose("dataset.generate.seconds=20", "dataset.generate.videos=1", "dataset.user_types=null", tmp_path=tmp_path)
    root = Path(cfg.dataset.root)
    assert not root.exists()
    loaded = load_dataset(cfg.dataset)
    assert root.is_dir() and len(loaded.conversations) == 2
    stamp = (root / "processed_data/synthetic/frames/synthetic_000.arrow").stat().st_mtime_ns
    load_dataset(cfg.dataset)  # second use: reused, not regenerated
    assert (root / "processed_data/synthetic/frames/synthetic_000.arrow").stat().st_mtime_ns == stamp


def test_generator_cli(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "prospect.data.synthetic", "--root", str(tmp_path), "--videos", "1", "--seconds", "12"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "processed_data/synthetic/prepared/dialog_test_L0_I1.jsonl").is_file()
    assert not (tmp_path / "processed_data/synthetic/prepared/dialog-klg_test_L0_I1.jsonl").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "prospect.data.synthetic", "--root", str(tmp_path), "--videos", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.strip() == "prospect.data.synthetic: error: --videos must be at least 1, got 0"


def test_more_hostile_lines_bom_offsets_deep_nesting_and_wrong_types(synthetic_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    path = root / "processed_data/synthetic/prepared/dialog_test_L0_I1.jsonl"
    good = path.read_bytes().splitlines()
    sample = json.loads(good[2])
    turns = sample["conversation"]
    first_assistant = next(i for i, t in enumerate(turns) if t["role"] == "assistant")
    bad_reference = sample | {"conversation": turns[:first_assistant] + [turns[first_assistant] | {"content": 123}] + turns[first_assistant + 1 :]}
    lines = [
        b"\xef\xbb\xbf{\"a\": \"\xff\"}",  # 1: a byte-order mark, then a bad byte at file offset 10 (3 + 7)
        b"[" * 100_000,  # 2: nested too deeply (valid UTF-8)
        b"[" * 100_000 + b"\xff",  # 3: and not UTF-8
        json.dumps(bad_reference).encode(),  # 4: an assistant turn whose content is not a string
        json.dumps(sample | {"metadata": sample["metadata"] | {"add_knowledge": "no"}}).encode(),  # 5
        good[3],  # 6
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    loaded = load_conversations(root, "synthetic", "dialog_test_L0_I1")
    assert [c.id for c in loaded.conversations] == ["synthetic_001/0/talk_some_1"]
    reasons = {s.line: s.reason.split(f"{path}:{s.line}: ", 1)[1] for s in loaded.skipped}
    assert reasons[1] == "not UTF-8 text (invalid byte 0xff at byte offset 10)"
    assert reasons[2] == "malformed JSON (nested too deeply)"
    assert reasons[3].startswith("not UTF-8 text (invalid byte 0xff")
    assert reasons[4] == f"video synthetic_001: turn {first_assistant} (assistant) content must be a string, got int"
    assert reasons[5] == "video synthetic_001: metadata.add_knowledge must be true or false, got 'no'"


def test_timed_turn_at_the_end_of_the_last_frame_still_follows_it():
    from PIL import Image

    from prospect.data.proassist import conversation_from_images

    images = [Image.new("RGB", (8, 8))] * 100  # 100 frames at 2 fps: frame 99 ends at 50 s
    turns = [{"role": "user", "content": "Hi.", "time": 1.0}, {"role": "assistant", "content": "Last step.", "time": 50.0}]
    conversation = conversation_from_images("v", images, turns, fps=2.0)
    assert conversation.num_frames == 100
    assert conversation.frames[-1].reference == "Last step."
    dropped = conversation_from_images("v", images, turns + [{"role": "assistant", "content": "Too late.", "time": 60.0}], fps=2.0)
    assert [f.reference for f in dropped.frames if f.reference] == ["Last step."]
