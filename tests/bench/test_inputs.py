"""The benchmark's synthetic data: summaries spread over a token range for variable-length runs."""

from __future__ import annotations

import json

import pytest

from internvl.bench.inputs import prepare_videos


def test_variable_length_summaries_span_the_requested_token_range(tiny_tokenizer, tmp_path):
    meta = prepare_videos(tmp_path / "videos", num_frames=1, num_samples=5, num_videos=1, summary_tokens=(20, 200),
                          tokenizer=tiny_tokenizer)  # fmt: skip
    records = [json.loads(line) for line in (meta.parent / "train.jsonl").read_text().splitlines()]
    lengths = [len(tiny_tokenizer(r["conversations"][1]["value"], add_special_tokens=False)["input_ids"])
               for r in records]  # fmt: skip
    assert sorted(lengths) == pytest.approx([20, 65, 110, 155, 200], abs=2)
    assert lengths != sorted(lengths)  # shuffled: batches mix long and short summaries
