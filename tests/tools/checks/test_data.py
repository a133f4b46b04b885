"""The data checks refuse exactly the records training skips (both go through parse_record), and hand the longest
answer on to the memory check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from internvl.data import build_datasets
from internvl.data.records import RecordError
from internvl.tools.checks import Status, data, model
from tests.prepared import TRAIN, VAL, annotation_path
from tests.tools.checks.test_settings import context_for


def test_refused_records_are_the_ones_training_skips(setup_copy, tiny_tokenizer):
    train_file = annotation_path(setup_copy / "data")
    lines = train_file.read_text().splitlines()
    good = json.loads(lines[0])
    late_system = dict(good, conversations=[*good["conversations"], {"from": "system", "value": "Be brief."}])
    both_media = dict(good, image="frame.png")
    train_file.write_text("\n".join([*lines, json.dumps(late_system), json.dumps(both_media)]) + "\n")

    results, context = data.check_data(context_for(setup_copy))
    [refused] = [r for r in results if r.status == Status.FAIL]
    assert refused.name == "data video_summary_dataset_train"
    assert f"2 of {len(lines) + 2} records are unusable" in refused.message
    assert context.answer_tokens is None  # no tokenizer in this context: the model section did not run

    train, _ = build_datasets(setup_copy / "data" / "meta.json", tiny_tokenizer, min_num_frame=2, max_num_frame=2)
    skipped = []
    for index in range(len(train.datasets[0])):
        try:
            train.datasets[0].get_sample(index, np.random.default_rng(0))
        except RecordError as error:
            skipped.append(str(error))
    assert skipped == [
        f"{train_file}:{len(lines) + 1}: a 'system' turn may only come first",
        f"{train_file}:{len(lines) + 2}: a record has either 'image' or 'video', not both",
    ]
    for message in skipped:
        assert message in refused.message  # the same file:line and the same reason


def test_the_longest_answer_is_handed_on(good_setup):
    _, context = model.check_model(context_for(good_setup))
    results, context = data.check_data(context)
    assert all(r.status == Status.OK for r in results), results
    answers = [
        [turn["value"] for turn in json.loads(line)["conversations"] if turn["from"] == "gpt"]
        for name in (TRAIN, VAL)
        for line in annotation_path(good_setup / "data", name).read_text().splitlines()
    ]
    tokens = [sum(len(context.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1 for text in record)
              for record in answers]  # fmt: skip
    assert context.answer_tokens == max(tokens)


def test_meta_paths_are_read_from_where_training_reads_them(setup_copy, monkeypatch):
    """Data prepared with relative paths (the official convention) passes from the folder prepare ran in and fails
    from any other, naming that folder, as training would."""
    from internvl.data.prepare import prepare_dataset

    monkeypatch.chdir(setup_copy)
    prepare_dataset(Path("raw"), Path("official"), progress=False)
    context = context_for(setup_copy, META_PATH=str(setup_copy / "official" / "meta.json"))
    results, _ = data.check_data(context)
    assert not [r for r in results if r.status == Status.FAIL], results
    assert any(r.name == "meta.json" and r.status == Status.OK for r in results)

    monkeypatch.chdir(setup_copy / "model")
    results, _ = data.check_data(context)
    [refused] = [r for r in results if r.status == Status.FAIL]
    assert refused.name == "meta.json"
    assert f"root 'raw' not found in the working directory {setup_copy / 'model'}" in refused.message
