"""Standard text-generation metrics for summaries: ROUGE-1/2/L, BLEU-4, CIDEr and (when possible) METEOR.

Every score is on a 0-100 scale, as in captioning papers (CIDEr x 100, so a perfect CIDEr is 1000).
One reference per prediction.

- ROUGE: ``rouge-score`` F-measure with its Porter stemmer, averaged over samples.
- BLEU-4: ``sacrebleu`` corpus BLEU with its default ``13a`` tokenizer.
- CIDEr: ``pycocoevalcap``'s pure-Python CIDEr-D scorer on lower-cased word tokens (the Java PTB tokenizer is
  not used). Its IDF comes from the evaluated references, so scores depend on the set: a single sample always
  scores 0.
- METEOR: NLTK's ``meteor_score``, which needs the WordNet corpus; without it METEOR is reported as skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
METRIC_NAMES = (*ROUGE_TYPES, "bleu4", "cider", "meteor")
METRIC_TITLES = {
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "bleu4": "BLEU-4",
    "cider": "CIDEr",
    "meteor": "METEOR",
}

_WORD = re.compile(r"\w+")


@dataclass
class MetricResult:
    """Corpus scores plus the metrics that could not be computed, each with the reason."""

    num_samples: int
    scores: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)


def word_tokens(text: str) -> list[str]:
    """Lower-cased word tokens with punctuation dropped (what the PTB tokenizer yields for plain English)."""
    return _WORD.findall(text.lower())


def rouge_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        # rouge-score's argument order is (target, prediction).
        for name, score in scorer.score(reference, prediction).items():
            totals[name] += score.fmeasure
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}


def bleu4_score(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def cider_score(predictions: list[str], references: list[str]) -> float:
    from pycocoevalcap.cider.cider import Cider

    ids = range(len(predictions))
    hypotheses = {i: [" ".join(word_tokens(predictions[i]))] for i in ids}
    targets = {i: [" ".join(word_tokens(references[i]))] for i in ids}
    score, _ = Cider().compute_score(targets, hypotheses)
    return 100.0 * float(score)


def meteor_unavailable_reason() -> str | None:
    """Why METEOR cannot be computed here, or None when it can."""
    try:
        from nltk.corpus import wordnet
        from nltk.translate import meteor_score  # noqa: F401

        wordnet.ensure_loaded()
    except ImportError as error:
        return f"nltk is not installed ({error})"
    except LookupError:
        return "NLTK WordNet data is not installed (python -m nltk.downloader wordnet)"
    return None


def meteor(predictions: list[str], references: list[str]) -> float:
    from nltk.translate.meteor_score import meteor_score

    total = sum(
        meteor_score([word_tokens(reference)], word_tokens(prediction))
        for prediction, reference in zip(predictions, references)
    )
    return 100.0 * total / len(predictions)


def compute_metrics(predictions: list[str], references: list[str]) -> MetricResult:
    """Score ``predictions`` against ``references`` (same order, one reference each)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")

    scores = rouge_scores(predictions, references)
    scores["bleu4"] = bleu4_score(predictions, references)
    scores["cider"] = cider_score(predictions, references)
    skipped = {}
    reason = meteor_unavailable_reason()
    if reason is None:
        scores["meteor"] = meteor(predictions, references)
    else:
        skipped["meteor"] = reason
    return MetricResult(num_samples=len(predictions), scores=scores, skipped=skipped)
