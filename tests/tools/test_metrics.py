"""Metrics against values counted by hand."""

from __future__ import annotations

import pytest

from internvl.tools import metrics
from internvl.tools.metrics import compute_metrics, word_tokens


def test_rouge_f_measures_match_hand_counts():
    # prediction: a red circle moves (4 words); reference: a red square moves to the left (7 words).
    # Unigrams in common: a, red, moves -> P = 3/4, R = 3/7, F = 2PR / (P + R) = 18/33.
    # Bigrams in common: "a red" -> P = 1/3, R = 1/6, F = 2/9. LCS "a red moves" = 3 words -> same as ROUGE-1.
    # The second pair is identical: F = 1 for every ROUGE. Scores are means over the pairs, x 100.
    scores = metrics.rouge_scores(
        ["A red circle moves.", "The dog runs in the park."],
        ["A red square moves to the left.", "The dog runs in the park."],
    )
    assert scores["rouge1"] == pytest.approx(100 * (18 / 33 + 1) / 2)
    assert scores["rouge2"] == pytest.approx(100 * (2 / 9 + 1) / 2)
    assert scores["rougeL"] == pytest.approx(100 * (18 / 33 + 1) / 2)


def test_bleu4_matches_hand_computation():
    # "the cat sat on the mat" vs "the cat sat on the rug": n-gram precisions 5/6, 4/5, 3/4, 2/3, equal lengths
    # (brevity penalty 1), so BLEU = (5/6 * 4/5 * 3/4 * 2/3) ** (1/4) = (1/3) ** (1/4).
    assert metrics.bleu4_score(["the cat sat on the mat"], ["the cat sat on the rug"]) == pytest.approx(
        100 * (1 / 3) ** 0.25
    )
    assert metrics.bleu4_score(["a blue square moves up"], ["a blue square moves up"]) == pytest.approx(100)


def test_cider_is_maximal_for_identical_and_zero_for_disjoint_text():
    references = ["a red circle moves from left to right", "two green squares move up and down slowly"]
    # Identical: every n-gram vector has cosine 1 and no length penalty, so CIDEr-D = 10 (1000 on our scale).
    assert metrics.cider_score(references, references) == pytest.approx(1000)
    assert metrics.cider_score(["purple stars", "yellow rain falls"], references) == 0.0


def test_cider_partial_match_matches_hand_computation():
    # Two records, so an n-gram found in one reference only has IDF log(2 / 1) = log 2 and one found in both has 0.
    # Record 1 is identical to its reference: unigram and bigram cosines 1, no 3- or 4-grams -> (1 + 1) / 4 x 10 = 5.
    # Record 0, "red square" vs "red circle": unigram vectors (red, square) and (red, circle), each weight log 2;
    # clipped product log2 * log2 over norms sqrt(2) log 2 each -> 1/2; no shared bigram; equal lengths (no
    # penalty) -> (1/2) / 4 x 10 = 1.25. CIDEr-D = (1.25 + 5) / 2 = 3.125, i.e. 312.5 on our scale.
    assert metrics.cider_score(["red square", "blue square"], ["red circle", "blue square"]) == pytest.approx(312.5)


def test_cider_tokenization_ignores_case_and_punctuation():
    references = ["A red circle moves.", "Two squares move up!"]
    assert metrics.cider_score(["a RED circle moves", "two squares, move up"], references) == pytest.approx(1000)
    assert word_tokens("Two squares, move up!") == ["two", "squares", "move", "up"]


def test_compute_metrics_reports_every_metric_or_why_it_is_skipped():
    result = compute_metrics(["a red circle moves", "a dog runs"], ["a red circle moves", "a cat sleeps"])
    assert result.num_samples == 2
    assert set(result.scores) | set(result.skipped) == set(metrics.METRIC_NAMES)
    assert {"rouge1", "rouge2", "rougeL", "bleu4", "cider"} <= set(result.scores)
    assert all(0 <= value <= 1000 for value in result.scores.values())


def test_meteor_without_wordnet_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(metrics, "meteor_unavailable_reason", lambda: "NLTK WordNet data is not installed")
    result = compute_metrics(["a red circle"], ["a red circle"])
    assert "meteor" not in result.scores
    assert result.skipped == {"meteor": "NLTK WordNet data is not installed"}


def test_meteor_is_averaged_over_samples_when_available(monkeypatch):
    """METEOR's WordNet data is usually absent offline; NLTK's scorer is replaced to check what we feed it."""
    import nltk.translate.meteor_score as nltk_meteor

    calls = []

    def fake_meteor(references, hypothesis):
        calls.append((references, hypothesis))
        return 0.5 if hypothesis == references[0] else 0.0

    monkeypatch.setattr(metrics, "meteor_unavailable_reason", lambda: None)
    monkeypatch.setattr(nltk_meteor, "meteor_score", fake_meteor)
    result = compute_metrics(["A red circle.", "a dog"], ["a red circle", "a cat"])
    assert result.scores["meteor"] == pytest.approx(100 * (0.5 + 0.0) / 2)
    assert result.skipped == {}
    # NLTK wants pre-tokenized input: a list of reference token lists and the hypothesis tokens.
    assert calls[0] == ([["a", "red", "circle"]], ["a", "red", "circle"])


def test_mismatched_or_empty_inputs_are_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics([], [])
