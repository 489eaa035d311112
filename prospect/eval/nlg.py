"""Optional corpus-level NLG scores on correct pairs (BLEU-1..4, CIDEr, METEOR), as ProAssist reports.

Needs the `nlg` extra (pycocoevalcap). Text is tokenized here (lowercase, punctuation stripped)
instead of with the Java PTB tokenizer; METEOR runs only when `java` is on PATH (one warning
otherwise). Scores are corpus level: CIDEr's document frequencies come from the pooled pairs.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence

from prospect.eval.embeddings import EvalSetupError
from prospect.eval.metrics import BLEU, CIDER, METEOR

log = logging.getLogger(__name__)

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")


def tokenize(text: str) -> str:
    """Lowercase words separated by single spaces; punctuation is dropped ("Now, unscrew it!" -> "now unscrew it")."""
    return " ".join(_WORD.findall(text.lower()))


def meteor_available() -> bool:
    return shutil.which("java") is not None


class NLGScorer:
    """Scores lists of (generation, reference) pairs; METEOR's Java process starts once per scorer.

    Use as a context manager (the Java process stops on exit).
    """

    def __init__(self) -> None:
        try:
            from pycocoevalcap.bleu.bleu import Bleu  # lazy, with the next: the optional nlg extra, only with eval.nlg_metrics=true
            from pycocoevalcap.cider.cider import Cider
        except ImportError:
            raise EvalSetupError(
                "eval.nlg_metrics=true needs pycocoevalcap; run: pip install prospect[nlg] (or pip install pycocoevalcap)"
            ) from None
        self._bleu, self._cider = Bleu(4), Cider()
        self._meteor = None
        if meteor_available():
            from pycocoevalcap.meteor.meteor import Meteor  # lazy: the optional nlg extra, only with eval.nlg_metrics=true

            self._meteor = Meteor()
        else:
            log.warning("eval.nlg_metrics: java is not on PATH, METEOR is skipped (BLEU and CIDEr are computed)")

    @property
    def names(self) -> tuple[str, ...]:
        return BLEU + (CIDER,) + ((METEOR,) if self._meteor is not None else ())

    def score(self, pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
        """Corpus-level scores of (generation, reference) pairs; all 0 when there are no pairs."""
        if not pairs:
            return {name: 0.0 for name in self.names}
        hypotheses = {str(k): [tokenize(gen)] for k, (gen, _) in enumerate(pairs)}
        references = {str(k): [tokenize(ref)] for k, (_, ref) in enumerate(pairs)}
        bleu, _ = self._bleu.compute_score(references, hypotheses, verbose=0)
        scores = {name: float(value) for name, value in zip(BLEU, bleu)}
        scores[CIDER] = float(self._cider.compute_score(references, hypotheses)[0])
        if self._meteor is not None:
            scores[METEOR] = float(self._meteor.compute_score(references, hypotheses)[0])
        return scores

    def close(self) -> None:
        if self._meteor is not None:
            process = self._meteor.meteor_p
            process.stdin.close()
            process.kill()
            process.wait()
            self._meteor = None

    def __enter__(self) -> NLGScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
