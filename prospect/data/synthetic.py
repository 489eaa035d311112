"""Deterministic synthetic data in ProAssist's format, so tests and the offline default need no download.

    python -m prospect.data.synthetic --root DIR [--videos N] [--seconds S] [--fps 2] [--seed K] [--knowledge] [--named-user]

writes DIR/processed_data/synthetic/frames/<video>.arrow (ArrowWriter, column `frame`, base64 JPEG,
384x384) and DIR/processed_data/synthetic/prepared/dialog_test_L0_I1.jsonl, plus
dialog-klg_test_L0_I1.jsonl with --knowledge (a "Task knowledge: ..." system turn after the first
user turn, as ProAssist's dialog-klg files). Each video shows a drawn workbench on which one part
appears per task step; each video has two conversations (user types no_talk and talk_some) with a
goal statement, an assistant instruction at every step transition and occasional feedback. Later
instructions are predictable only from the knowledge and earlier turns, so context retention matters.
With --named-user the user also gives their name once, in a user turn two frames after the goal (so after
ProAssist's initial cache, which strategies keep whole), and every later assistant turn addresses them by
it: a reference reply is predictable only where that one dialogue turn is still in the cache. Without the
option the files are those of earlier versions, byte for byte. The same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from prospect.data.frames import FRAME_COLUMN, encode_jpeg

SUBSET = "synthetic"
SPLIT = "test"
FRAME_SIZE = 384
GENERATOR_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Task:
    goal: str  # as ProAssist's inferred goal
    request: str  # what the user says they want to do
    product: str
    steps: tuple[str, ...]  # imperative instructions, one per step


TASKS = (
    Task(
        "Assembling a Toy Race Car",
        "put this toy race car together",
        "race car",
        (
            "Attach the four wheels to the chassis",
            "Snap the axle covers into place",
            "Mount the driver's seat",
            "Fix the steering wheel to the dashboard",
            "Attach the rear spoiler",
            "Put the roof panel on",
            "Apply the number stickers",
        ),
    ),
    Task(
        "Building a Wooden Birdhouse",
        "build this wooden birdhouse",
        "birdhouse",
        (
            "Lay the base board flat on the bench",
            "Nail the two side walls to the base",
            "Attach the back wall",
            "Fit the front wall with the round entrance hole",
            "Place the two roof panels",
            "Insert the perch below the hole",
            "Sand the rough edges",
        ),
    ),
    Task(
        "Repairing a Bicycle Tire",
        "fix the flat tire on this bicycle wheel",
        "wheel",
        (
            "Let the remaining air out of the tube",
            "Lever the tire off the rim",
            "Pull out the inner tube",
            "Patch the puncture",
            "Tuck the tube back inside the tire",
            "Press the tire bead onto the rim",
            "Inflate the tire to the marked pressure",
        ),
    ),
    Task(
        "Making a Turkey Sandwich",
        "make a turkey sandwich",
        "sandwich",
        (
            "Place two slices of bread on the board",
            "Spread mustard on one slice",
            "Add the lettuce leaves",
            "Layer the turkey slices",
            "Add the tomato slices",
            "Put a slice of cheese on top",
            "Close the sandwich and cut it in half",
        ),
    ),
    Task(
        "Assembling a Desk Lamp",
        "assemble this desk lamp",
        "lamp",
        (
            "Screw the pole into the base",
            "Attach the arm to the top of the pole",
            "Fit the lamp head onto the arm",
            "Screw in the light bulb",
            "Clip on the shade",
            "Route the cable along the arm",
            "Plug in the lamp and test the switch",
        ),
    ),
    Task(
        "Potting a Houseplant",
        "repot this houseplant",
        "plant pot",
        (
            "Put a layer of gravel in the new pot",
            "Add fresh soil up to a third of the pot",
            "Ease the plant out of its old pot",
            "Loosen the roots with your fingers",
            "Set the plant in the middle of the new pot",
            "Fill the gaps with soil and press it down",
            "Water the plant until it drains",
        ),
    ),
)

SYSTEM_PROMPTS = (
    "You are a proactive assistant. Watch what the user does and guide them through the task step by step.",
    "You are a helpful assistant that sees what the user sees. Offer the next instruction when a step is done.",
    "You assist a user with a hands-on task. Give short, timely instructions and feedback without being asked.",
)
GOAL_STATEMENTS = ("I want to {request}.", "Hi, can you help me {request}?", "Today I'd like to {request}.")
FIRST_INSTRUCTIONS = ("Sure, let's get started. First, {step}.", "Happy to help! The first step is to {step}.")
NEXT_INSTRUCTIONS = (
    "Next, {step}.",
    "Good job. Now {step}.",
    "Well done! The next step is to {step}.",
    "Nice work. Now it's time to {step}.",
)
FEEDBACK = (
    "That looks right, keep going.",
    "Good, you're on the right track.",
    "Take your time, this part needs care.",
)
USER_QUESTIONS = ("What should I do next?", "Okay, what's next?", "Done. What now?")
CHECK_QUESTIONS = ("Is this right?", "Does this look okay?")
CHECK_ANSWERS = ("Yes, that looks good.", "Yes, that's correct.")
FINAL_REMARKS = ("Great job! The {product} is finished.", "Well done, you have completed every step of the {product}.")
USER_NAMES = ("Maya", "Tomas", "Priya", "Jonah", "Lena", "Omar", "Ines", "Felix", "Aiko", "Ravi", "Nora", "Kofi", "Elena",
              "Mateo", "Sofia", "Arjun", "Hana", "Lukas", "Zara", "Diego", "Mira", "Yusuf", "Clara", "Theo")
NAME_STATEMENTS = ("By the way, my name is {name}.", "I'm {name}, by the way.", "Oh, and call me {name}.")

PALETTE = ((200, 60, 50), (60, 120, 200), (240, 190, 40), (70, 160, 90), (150, 80, 170), (240, 130, 40), (40, 170, 170))


def lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


@dataclass(frozen=True)
class VideoPlan:
    """Frame-level plan of one video: step k is active from boundaries[k] (original frame index)."""

    video_uid: str
    task: Task
    num_frames: int
    start_frame: int  # first frame of the clip (the frames before it show the empty bench)
    goal_frame: int  # the user states the goal before this frame
    boundaries: tuple[int, ...]  # frame where step k begins; boundaries[-1] = all steps done
    layout: tuple[tuple[int, int, int, str], ...]  # per step: x, y, size, shape


def plan_video(index: int, seconds: float, fps: float, rng: random.Random) -> VideoPlan:
    num_frames = int(seconds * fps)
    if num_frames < 16:
        raise ValueError(f"--seconds {seconds} at --fps {fps} gives {num_frames} frames; need at least 16")
    task = TASKS[rng.randrange(len(TASKS))]
    start = min(2, num_frames // 10)
    goal_frame = start + max(2, int(1.5 * fps))
    last_usable = num_frames - 2
    num_steps = max(2, min(len(task.steps), round(seconds / 8)))
    span = last_usable - (goal_frame + 1)  # frames shared out between the steps
    min_gap = 3
    num_steps = max(2, min(num_steps, span // min_gap))
    weights = [rng.uniform(0.6, 1.4) for _ in range(num_steps)]
    lengths = [max(min_gap, round(span * w / sum(weights))) for w in weights]
    while sum(lengths) > span:
        lengths[lengths.index(max(lengths))] -= 1
    edges = [goal_frame + 1]
    for length in lengths:
        edges.append(edges[-1] + length)
    layout = []
    for k in range(num_steps):
        angle = 2 * math.pi * k / num_steps + rng.uniform(-0.3, 0.3)
        radius = rng.randint(40, 90)
        x = FRAME_SIZE // 2 + int(radius * math.cos(angle))
        y = int(FRAME_SIZE * 0.66) + int(0.45 * radius * math.sin(angle))
        layout.append((x, y, rng.randint(16, 30), rng.choice(("rect", "ellipse", "triangle"))))
    return VideoPlan(
        video_uid=f"{SUBSET}_{index:03d}",
        task=task,
        num_frames=num_frames,
        start_frame=start,
        goal_frame=goal_frame,
        boundaries=tuple(edges),
        layout=tuple(layout),
    )


def active_step(plan: VideoPlan, frame: int) -> int:
    """Steps completed before `frame` (0..num_steps); the part of that step is being worked on."""
    return sum(1 for edge in plan.boundaries[1:] if frame >= edge)


def draw_frame(plan: VideoPlan, frame: int) -> Image.Image:
    image = Image.new("RGB", (FRAME_SIZE, FRAME_SIZE), (206, 208, 214))
    draw = ImageDraw.Draw(image)
    bench_top = int(FRAME_SIZE * 0.42)
    draw.rectangle((0, bench_top, FRAME_SIZE, FRAME_SIZE), fill=(150, 108, 66))
    for y in range(bench_top + 9, FRAME_SIZE, 17):
        draw.line((0, y, FRAME_SIZE, y + 3), fill=(132, 94, 56), width=2)
    draw.rectangle((10, 10, 120, 80), fill=(236, 236, 230), outline=(90, 90, 90))  # wall chart
    num_steps = len(plan.layout)
    done = active_step(plan, frame) if frame >= plan.goal_frame else -1
    for k, (x, y, size, shape) in enumerate(plan.layout):
        color = PALETTE[k % len(PALETTE)]
        box = (x - size, y - size, x + size, y + size)
        if k < done:
            _draw_shape(draw, shape, box, fill=color)
        elif k == done:
            _draw_shape(draw, shape, box, outline=color)
        # pending parts wait in the tray at the bottom left
        if k >= max(done, 0):
            tx, ty = 18 + 26 * k, FRAME_SIZE - 22
            _draw_shape(draw, shape, (tx - 9, ty - 9, tx + 9, ty + 9), fill=color)
        draw.line((20, 22 + 8 * k, 20 + (90 if k < done else 30), 22 + 8 * k), fill=(60, 60, 60), width=2)
    if 0 <= done < num_steps:  # the hand circles the part being worked on
        x, y, size, _ = plan.layout[done]
        phase = 0.9 * frame
        hx, hy = x + int(1.6 * size * math.cos(phase)), y + int(1.1 * size * math.sin(phase))
        draw.ellipse((hx - 14, hy - 10, hx + 14, hy + 10), fill=(226, 180, 150), outline=(170, 120, 95))
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill=None, outline=None) -> None:
    width = 3 if outline is not None else 1
    if shape == "rect":
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif shape == "ellipse":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    else:
        x0, y0, x1, y1 = box
        draw.polygon(((x0, y1), ((x0 + x1) // 2, y0), (x1, y1)), fill=fill, outline=outline, width=width)


def name_user(events: list[tuple[int, dict]], plan: VideoPlan, name_rng: random.Random) -> list[tuple[int, dict]]:
    """The events with a user turn giving the user's name two frames after the goal statement (after the first
    instruction), and every assistant turn after it addressing the user by that name."""
    name = name_rng.choice(USER_NAMES)
    when = plan.goal_frame + 2  # events come in frame order; the next one is at least two frames later
    statement = (when, {"role": "user", "content": name_rng.choice(NAME_STATEMENTS).format(name=name)})
    before = [event for event in events if event[0] < when]
    after = [(frame_idx, {**turn, "content": f"{name}, {lower_first(turn['content'])}"} if turn["role"] == "assistant" else turn)
             for frame_idx, turn in events if frame_idx >= when]
    return before + [statement] + after


def conversation_events(plan: VideoPlan, user_type: str, rng: random.Random) -> list[tuple[int, dict]]:
    """(frame_idx, turn) pairs in ProAssist's convention: the turn follows the frames [previous, frame_idx).

    A user/system turn is fed before frame `frame_idx`; an assistant turn is the reference of frame
    `frame_idx - 1`. Times are seconds in the video, inside [frame_idx, frame_idx + 1) / fps.
    """
    task, steps = plan.task, plan.task.steps
    num_steps = len(plan.layout)
    events: list[tuple[int, dict]] = [(plan.goal_frame, {"role": "user", "content": rng.choice(GOAL_STATEMENTS).format(request=task.request)})]
    events.append((plan.goal_frame + 1, {"role": "assistant", "content": rng.choice(FIRST_INSTRUCTIONS).format(step=lower_first(steps[0]))}))
    for k in range(1, num_steps + 1):
        edge = plan.boundaries[k]
        previous = plan.boundaries[k - 1]
        length = edge - previous
        if length >= 10 and rng.random() < 0.5:  # occasional feedback in the middle of a long step
            middle = previous + length // 2
            if user_type == "talk_some" and rng.random() < 0.5:
                events.append((middle, {"role": "user", "content": rng.choice(CHECK_QUESTIONS)}))
                events.append((middle + 1, {"role": "assistant", "content": rng.choice(CHECK_ANSWERS)}))
            else:
                events.append((middle + 1, {"role": "assistant", "content": rng.choice(FEEDBACK)}))
        if k == num_steps:
            text = rng.choice(FINAL_REMARKS).format(product=task.product)
        elif user_type == "talk_some" and rng.random() < 0.35:
            events.append((edge, {"role": "user", "content": rng.choice(USER_QUESTIONS)}))
            text = f"Now {lower_first(steps[k])}."
        else:
            text = rng.choice(NEXT_INSTRUCTIONS).format(step=lower_first(steps[k]))
        events.append((edge + 1, {"role": "assistant", "content": text}))
    return events


def build_sample(plan: VideoPlan, user_type: str, user_index: int, system_prompt: str, knowledge: bool, rng: random.Random, fps: float,
                 name_rng: random.Random | None = None) -> dict:
    """One conversation of `plan`; with `name_rng`, the user gives a name the assistant uses (name_user)."""
    task = plan.task
    knowledge_text = "\n".join([task.goal] + [f"{i + 1}. {step}" for i, step in enumerate(task.steps[: len(plan.layout)])])
    conversation: list[dict] = [{"role": "system", "content": system_prompt}]
    cursor = plan.start_frame
    first_user = True
    words = 0
    events = conversation_events(plan, user_type, rng)
    if name_rng is not None:
        events = name_user(events, plan, name_rng)
    for frame_idx, turn in events:
        if frame_idx > cursor:
            conversation.append({"role": "frames", "start": cursor, "end": frame_idx})
            cursor = frame_idx
        turn = {"role": turn["role"], "time": round((frame_idx + 0.2) / fps, 2), "content": turn["content"], "labels": ""}
        conversation.append(turn)
        words += len(turn["content"].split())
        if knowledge and first_user and turn["role"] == "user":
            conversation.append({"role": "system", "content": f"Task knowledge: {knowledge_text}"})
            first_user = False
    return {
        "dataset": SUBSET,
        "video_uid": plan.video_uid,
        "clip_idx": 0,
        "frames_file": f"frames/{plan.video_uid}.arrow",
        "max_seq_len": 0,
        "seq_len": (cursor - plan.start_frame) + words,  # approximate: one token per frame + words
        "num_tokens_per_img": 1,
        "use_img_sep_token": False,
        "start_frame_idx": plan.start_frame,
        "end_frame_idx": cursor,
        "fps": fps,
        "metadata": {
            "user_type": user_type,
            "user_id": f"{user_type}_{user_index}",
            "task_goal": task.goal,
            "knowledge": knowledge_text,
            "progress": None,
            "add_knowledge": knowledge,
            "has_summary": False,
            "summary_only": False,
            "quality": 10.0,
        },
        "conversation": conversation,
    }


def annotation_name(knowledge: bool) -> str:
    return f"{'dialog-klg' if knowledge else 'dialog'}_{SPLIT}_L0_I1"


def generate(root: str | Path, videos: int = 2, seconds: float = 60, fps: float = 2, seed: int = 0, knowledge: bool = False,
             named_user: bool = False) -> Path:
    """Write the synthetic subset under root; returns the subset folder. Deterministic in its arguments."""
    from datasets.arrow_writer import ArrowWriter  # lazy: datasets costs ~0.7 s, only when files are written

    if videos < 1:
        raise ValueError(f"--videos must be at least 1, got {videos}")
    if fps <= 0 or seconds <= 0:
        raise ValueError(f"--seconds and --fps must be positive, got {seconds} and {fps}")
    subset_folder = Path(root).expanduser() / "processed_data" / SUBSET
    frames_folder, prepared_folder = subset_folder / "frames", subset_folder / "prepared"
    frames_folder.mkdir(parents=True, exist_ok=True)
    prepared_folder.mkdir(parents=True, exist_ok=True)
    plain, with_knowledge = [], []
    for index in range(videos):
        rng = random.Random(f"prospect-synthetic/{seed}/{index}")
        plan = plan_video(index, seconds, fps, rng)
        with ArrowWriter(path=str(frames_folder / f"{plan.video_uid}.arrow")) as writer:
            for frame in range(plan.num_frames):
                writer.write({FRAME_COLUMN: encode_jpeg(draw_frame(plan, frame))})
            writer.finalize()
        system_prompt = rng.choice(SYSTEM_PROMPTS)
        for user_index, user_type in enumerate(("no_talk", "talk_some")):
            state = rng.getstate()
            names = (lambda: random.Random(f"prospect-synthetic/{seed}/{index}/{user_type}/name")) if named_user else (lambda: None)
            plain.append(build_sample(plan, user_type, user_index, system_prompt, False, rng, fps, names()))
            if knowledge:  # the same dialogue, with the knowledge turn
                rng.setstate(state)
                with_knowledge.append(build_sample(plan, user_type, user_index, system_prompt, True, rng, fps, names()))
    outputs = [(annotation_name(False), plain)] + ([(annotation_name(True), with_knowledge)] if knowledge else [])
    for name, samples in outputs:
        with (prepared_folder / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for sample in samples:
                handle.write(json.dumps(sample) + "\n")
    manifest = {"generator_version": GENERATOR_VERSION, "videos": videos, "seconds": seconds, "fps": fps, "seed": seed, "knowledge": knowledge,
                "named_user": named_user}
    (subset_folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return subset_folder


def ensure_generated(root: str | Path, videos: int, seconds: float, fps: float, seed: int, knowledge: bool,
                     named_user: bool = False) -> Path:
    """Generate into root unless a complete dataset made with the same arguments is already there."""
    subset_folder = Path(root).expanduser() / "processed_data" / SUBSET
    wanted = {"generator_version": GENERATOR_VERSION, "videos": videos, "seconds": seconds, "fps": fps, "seed": seed, "knowledge": knowledge,
              "named_user": named_user}
    manifest = subset_folder / MANIFEST
    if _manifest_matches(manifest, wanted):
        return subset_folder
    # generate into a private temporary folder, then move it in: an interrupted run leaves no half-written
    # dataset, and concurrent jobs (a sweep on a GPU pool) each finish with one complete copy in place
    Path(root).expanduser().mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=Path(root).expanduser()))
    try:
        generate(staging, videos, seconds, fps, seed, knowledge, named_user)
        if _manifest_matches(manifest, wanted):
            return subset_folder  # another process finished first
        if subset_folder.exists():
            shutil.rmtree(subset_folder, ignore_errors=True)
        subset_folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            (staging / "processed_data" / SUBSET).rename(subset_folder)
        except OSError:
            if not _manifest_matches(manifest, wanted):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return subset_folder


def _manifest_matches(manifest: Path, wanted: dict) -> bool:
    try:
        return manifest.is_file() and json.loads(manifest.read_text()) == wanted
    except (OSError, json.JSONDecodeError):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prospect.data.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="dataset root; writes ROOT/processed_data/synthetic/")
    parser.add_argument("--videos", type=int, default=2, help="number of videos (two conversations each)")
    parser.add_argument("--seconds", type=float, default=60, help="video length in seconds")
    parser.add_argument("--fps", type=float, default=2, help="frames per second (ProAssist: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--knowledge", action="store_true", help="also write dialog-klg_test_L0_I1.jsonl")
    parser.add_argument("--named-user", action="store_true", help="the user gives a name once; later assistant turns use it")
    args = parser.parse_args(argv)
    try:
        folder = generate(args.root, args.videos, args.seconds, args.fps, args.seed, args.knowledge, args.named_user)
    except ValueError as error:
        print(f"prospect.data.synthetic: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.videos} video(s) to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
