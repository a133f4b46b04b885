"""The plain loop narrowed to the recipe's micro-batch: its shape loop replaced, or a clear stop."""

from __future__ import annotations

import json
import sys

import pytest

from internvl.bench import baseline
from internvl.bench.baseline import narrowed_source

PLAIN = """import json, sys
res = []
for quant in (True, False):
    for bs, seq in ((1, 4096), (4, 4096), (2, 8192)):
        res.append(dict(quant=quant, batch=bs, seq=seq))
json.dump(res, open(sys.argv[1], "w"))
"""


def test_the_plain_loop_runs_nf4_at_the_recipes_micro_batch_only(tmp_path, monkeypatch):
    script = tmp_path / "plain_qlora_baseline.py"
    script.write_text(PLAIN)
    output = tmp_path / "plain.json"
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # the runner sets the script's own argv
    baseline.main([str(script), str(output), "4490", "--batch", "4"])
    assert json.loads(output.read_text()) == [{"quant": True, "batch": 4, "seq": 4490}]


def test_an_unknown_version_of_the_plain_loop_stops(tmp_path):
    with pytest.raises(ValueError, match="exactly once.*BASELINE_FULL=1"):
        narrowed_source(PLAIN.replace("(2, 8192)", "(2, 16384)"), batch=4, tokens=4490)
