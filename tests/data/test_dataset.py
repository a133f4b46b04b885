"""meta.json -> samples and batches for the tiny tokenizer: every official record type, the frame budget and the
bad-sample policy."""

from __future__ import annotations

import json
import logging
import re

import av
import numpy as np
import pytest
import torch
from PIL import Image

from internvl.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN
from internvl.data import InternVLDataCollator, build_datasets
from internvl.data.dataset import (
    META_FOLDER,
    DatasetHealthError,
    MetaEntry,
    NoEvaluationSampleError,
    has_eval_records,
    load_meta,
    write_meta,
)
from internvl.data.prepare import prepare_dataset
from internvl.data.video import VideoDecodeError
from tests.prepared import annotation_path

SMALL_VIDEO = dict(min_num_frame=2, max_num_frame=4)
FROM_META_FOLDER = {"paths_relative_to": "meta_folder"}


def _context_count(tokenizer, sample) -> int:
    return int((sample["input_ids"] == tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)).sum())


def _write_meta(folder, entries: dict[str, list[dict]], **settings) -> str:
    """One JSONL per entry, all with root = folder (paths relative to it)."""
    meta = {}
    for name, records in entries.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        options = {"paths_relative_to": META_FOLDER, **settings.get(name, {})}
        meta[name] = MetaEntry(root=".", annotation=f"{name}.jsonl", length=len(records), **options)
    write_meta(folder / "meta.json", meta)
    return str(folder / "meta.json")


def _turns(question: str, answer: str = "An answer.") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def prepared_demo(demo_videos_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("prepared")
    prepare_dataset(demo_videos_dir / "annotations.csv", output_dir, val_ratio=0.34, progress=False)
    return output_dir


def test_video_samples_and_batch(prepared_demo, tiny_tokenizer):
    train, evaluation = build_datasets(prepared_demo / "meta.json", tiny_tokenizer, **SMALL_VIDEO)
    assert (len(train), len(evaluation)) == (4, 2)
    records = [json.loads(line) for line in annotation_path(prepared_demo).open()]
    samples = [train[i] for i in range(len(train))]
    for record, sample in zip(records, samples):
        frames = sample["pixel_values"].shape[0]
        assert 2 <= frames <= 4
        assert sample["pixel_values"].shape == (frames, 3, 448, 448)
        assert sample["image_flags"].tolist() == [1] * frames
        assert _context_count(tiny_tokenizer, sample) == 256 * frames
        text = tiny_tokenizer.decode(sample["input_ids"])
        frame_lines = "".join(f"Frame-{i}: <img>" for i in range(1, frames + 1))
        assert frame_lines in text.replace(IMG_CONTEXT_TOKEN, "").replace("</img>\n", "")
        assert "<video>" not in text
        labels = sample["labels"]
        assert (
            tiny_tokenizer.decode(labels[labels != IGNORE_INDEX]) == record["conversations"][1]["value"] + "<|im_end|>"
        )

    batch = InternVLDataCollator(tiny_tokenizer.pad_token_id)(samples[:3])
    lengths = [len(sample["input_ids"]) for sample in samples[:3]]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(dim=1).tolist() == lengths
    assert batch["pixel_values"].shape[0] == sum(sample["pixel_values"].shape[0] for sample in samples[:3])
    assert _context_count(tiny_tokenizer, batch) == 256 * batch["pixel_values"].shape[0]
    assert len(train.lengths) == 4 and all(length > 256 * 2 for length in train.lengths)


def test_evaluation_samples_are_deterministic(prepared_demo, tiny_tokenizer):
    _, evaluation = build_datasets(prepared_demo / "meta.json", tiny_tokenizer, **SMALL_VIDEO)
    _, again = build_datasets(prepared_demo / "meta.json", tiny_tokenizer, **SMALL_VIDEO)
    for index in range(len(evaluation)):
        first, second = evaluation[index], again[index]
        assert all(torch.equal(first[key], second[key]) for key in first)


def _frame_indices(sample, every_frame: list[torch.Tensor]) -> list[int]:
    """Which frames of the video the sample's tiles are, found by comparing pixels with every decoded frame."""
    indices = []
    for tile in sample["pixel_values"]:
        found = [index for index, frame in enumerate(every_frame) if torch.equal(tile, frame)]
        assert len(found) == 1
        indices.append(found[0])
    return indices


def test_training_draws_random_frames_and_evaluation_takes_segment_middles(prepared_demo, tiny_tokenizer):
    from internvl.data import build_transform

    # Small tiles keep the pixel comparisons cheap; only which frames were taken matters here.
    train, evaluation = build_datasets(
        prepared_demo / "meta.json", tiny_tokenizer, min_num_frame=3, max_num_frame=3, image_size=32
    )
    meta = json.loads((prepared_demo / "meta.json").read_text())
    transform = build_transform(False, 32)

    def every_frame(name: str) -> list[torch.Tensor]:
        record = json.loads((prepared_demo / meta[name]["annotation"]).read_text().splitlines()[0])
        assert record["decoded_frames"] == 24
        with av.open(str(prepared_demo / meta[name]["root"] / record["video"])) as container:
            return [transform(frame.to_image()) for frame in container.decode(video=0)]

    # 24 frames in 3 segments: [0, 8), [8, 16), [16, 24); their middles are 3, 11 and 19.
    assert _frame_indices(evaluation[0], every_frame("video_summary_dataset_val")) == [3, 11, 19]
    train_frames = every_frame("video_summary_dataset_train")
    draws = [_frame_indices(train[0], train_frames) for _ in range(3)]
    for indices in draws:
        assert [index // 8 for index in indices] == [0, 1, 2]  # one frame in each segment
    assert len({tuple(indices) for indices in draws}) > 1


def test_frames_shrink_to_fit_max_seq_length(prepared_demo, tiny_tokenizer):
    three_frames, _ = build_datasets(prepared_demo / "meta.json", tiny_tokenizer, min_num_frame=3, max_num_frame=3)
    budget = len(three_frames[0]["input_ids"])
    train, _ = build_datasets(
        prepared_demo / "meta.json", tiny_tokenizer, min_num_frame=2, max_num_frame=8, max_seq_length=budget
    )
    end_id = tiny_tokenizer.convert_tokens_to_ids(IMG_END_TOKEN)
    frame_counts = set()
    for _ in range(3):
        sample = train[0]
        frames = sample["pixel_values"].shape[0]
        frame_counts.add(frames)
        assert len(sample["input_ids"]) <= budget
        assert _context_count(tiny_tokenizer, sample) == 256 * frames
        assert int((sample["input_ids"] == end_id).sum()) == frames  # every image span complete
        assert sample["labels"][-2] != IGNORE_INDEX  # the answer's <|im_end|> is still there
    assert max(frame_counts) <= 3
    assert train.bad_samples == 0


def test_sample_that_cannot_fit_min_frames_is_bad(prepared_demo, tiny_tokenizer):
    three_frames, _ = build_datasets(prepared_demo / "meta.json", tiny_tokenizer, min_num_frame=3, max_num_frame=3)
    budget = min(len(three_frames[i]["input_ids"]) for i in range(len(three_frames))) - 1
    train, _ = build_datasets(
        prepared_demo / "meta.json", tiny_tokenizer, min_num_frame=3, max_num_frame=5, max_seq_length=budget
    )
    with pytest.raises(DatasetHealthError, match="max_seq_length"):
        train[0]
    assert train.bad_samples >= 10


def test_bad_video_is_replaced_counted_and_logged(tmp_path, demo_videos_dir, tiny_tokenizer, caplog):
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    for name in ("demo_000.mp4", "demo_001.mp4"):
        (tmp_path / name).write_bytes((demo_videos_dir / name).read_bytes())
    meta = _write_meta(
        tmp_path,
        {
            "clips": [
                {"id": "broken", "video": "broken.mp4", "conversations": _turns("<video>\nSummarize.")},
                {"id": "a", "video": "demo_000.mp4", "conversations": _turns("<video>\nSummarize.")},
                {"id": "b", "video": "demo_001.mp4", "conversations": _turns("Summarize.")},  # <video> is prepended
            ]
        },
    )
    train, evaluation = build_datasets(meta, tiny_tokenizer, **SMALL_VIDEO)
    assert evaluation is None
    with caplog.at_level(logging.WARNING, logger="internvl.data.dataset"):
        sample = train[0]
    assert train.bad_samples == 1
    assert "broken.mp4" in caplog.text and "clips.jsonl:1" in caplog.text
    assert _context_count(tiny_tokenizer, sample) == 256 * sample["pixel_values"].shape[0]
    assert "Frame-1:" in tiny_tokenizer.decode(train[2]["input_ids"])


def test_a_refused_record_is_replaced_counted_and_logged(tmp_path, tiny_tokenizer, caplog):
    late_system = [*_turns("Hi?", "Hi."), {"from": "system", "value": "Be brief."}]
    evaluation_records = [{"conversations": late_system}, {"conversations": _turns("Yes?", "Yes.")}]
    meta = _write_meta(tmp_path, {"chat": [{"conversations": _turns("Hi?", "Hi.")}], "chat_val": evaluation_records})
    _, evaluation = build_datasets(meta, tiny_tokenizer)
    assert len(evaluation) == 2 and evaluation.lengths[0] == 0  # kept in place, never the longest
    with caplog.at_level(logging.WARNING, logger="internvl.data.dataset"):
        sample = evaluation[0]
    assert evaluation.bad_samples == 1
    assert "chat_val.jsonl:1 (unusable record): RecordError:" in caplog.text
    assert "chat_val.jsonl:1: a 'system' turn may only come first" in caplog.text
    assert tiny_tokenizer.decode(sample["input_ids"]).endswith("Yes.<|im_end|>\n")  # the next record instead


def test_a_frame_count_made_by_another_decoder_is_not_trusted(tmp_path, demo_videos_dir, tiny_tokenizer):
    # prepare ran with decord, which on a damaged file can count more frames than PyAV (training's decoder) decodes:
    # here 30 recorded for a file PyAV decodes 24 of. PyAV counts again instead of drawing frames past the end, which
    # failed every draw as if the file had changed.
    (tmp_path / "clip.mp4").write_bytes((demo_videos_dir / "demo_000.mp4").read_bytes())
    record = {"video": "clip.mp4", "decoded_frames": 30, "fps": 12.0, "conversations": _turns("<video>\nSum.")}
    by_decord = {**record, "decoder": "decord"}
    meta = _write_meta(tmp_path, {"clips": [by_decord], "clips_val": [by_decord]})
    train, evaluation = build_datasets(meta, tiny_tokenizer, min_num_frame=8, max_num_frame=8, image_size=32)
    assert evaluation[0]["pixel_values"].shape[0] == train[0]["pixel_values"].shape[0] == 8
    assert train.bad_samples == evaluation.bad_samples == 0

    # Counted by PyAV itself, a count above what decodes means the file changed, and the message says so. (8 segments
    # of 30 frames: the last one, [26, 30), lies past the 24 that decode.)
    meta = _write_meta(tmp_path, {"clips": [{**record, "decoder": "pyav"}]})
    (clips,) = build_datasets(meta, tiny_tokenizer, min_num_frame=8, max_num_frame=8, image_size=32)[0].datasets
    with pytest.raises(VideoDecodeError, match="only 24 frames decode with pyav but frame 2[6-9] was requested: the "
                       "frame count given .* is larger, so the file changed since it was prepared"):
        clips.get_sample(0, np.random.default_rng(0))


def test_mostly_bad_dataset_stops_with_a_clear_error(tmp_path, tiny_tokenizer):
    records = []
    for index in range(4):
        (tmp_path / f"bad{index}.mp4").write_bytes(bytes(100))
        records.append({"video": f"bad{index}.mp4", "conversations": _turns("<video>\nSummarize.")})
    train, _ = build_datasets(_write_meta(tmp_path, {"clips": records}), tiny_tokenizer, **SMALL_VIDEO)
    with pytest.raises(DatasetHealthError, match="10 in a row"):
        train[0]


def test_evaluation_skips_what_cannot_be_built_and_never_stops_with_a_health_error(tmp_path, tiny_tokenizer, caplog):
    """A val set mostly or wholly unbuildable (here: records with a late system turn) must not end a training run
    at its first evaluation: failing samples are skipped, remembered and counted; a set of which nothing builds
    says so with its own error, which the trainer turns into a skipped evaluation."""
    late_system = [*_turns("Hi?", "Hi."), {"from": "system", "value": "Be brief."}]
    records = [{"conversations": late_system} for _ in range(11)]
    records.append({"conversations": _turns("Yes?", "Yes.")})
    meta = _write_meta(tmp_path, {"chat": records[-1:], "chat_val": records})
    _, evaluation = build_datasets(meta, tiny_tokenizer)
    with caplog.at_level(logging.WARNING, logger="internvl.data.dataset"):
        samples = [evaluation[i] for i in range(len(evaluation))]  # 11 bad in a row: a training set would stop
    assert all(tiny_tokenizer.decode(s["input_ids"]).endswith("Yes.<|im_end|>\n") for s in samples)
    assert caplog.text.count("skipping bad evaluation sample") == 11  # each reported once, then remembered
    assert evaluation.bad_samples == sum(range(1, 12))  # every skip counted: sample i skips the 11 - i bad after it

    meta = _write_meta(tmp_path, {"chat": records[-1:], "chat_val": records[:1]})
    _, evaluation = build_datasets(meta, tiny_tokenizer)
    with pytest.raises(NoEvaluationSampleError, match="none of the 1 evaluation samples can be built"):
        evaluation[0]


def test_only_a_val_entry_with_records_means_evaluation(tmp_path):
    assert has_eval_records(_write_meta(tmp_path, {"a": [{"conversations": _turns("Hi?")}],
                                                   "a_val": [{"conversations": _turns("Hi?")}]}))  # fmt: skip
    # The empty entry older prepare versions wrote for --val-ratio 0, and one emptied by repeat_time.
    assert not has_eval_records(_write_meta(tmp_path, {"a": [{"conversations": _turns("Hi?")}], "a_val": []}))
    assert not has_eval_records(_write_meta(tmp_path, {"a": [{"conversations": _turns("Hi?")}],
                                                       "a_val": [{"conversations": _turns("Hi?")}]},
                                            a_val={"repeat_time": 0.5}))  # fmt: skip


def test_a_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"")
    (tmp_path / "a.jsonl").write_text("")
    entry = {"root": "clip.mp4", "annotation": "a.jsonl", "paths_relative_to": META_FOLDER}
    (tmp_path / "meta.json").write_text(json.dumps({"a": entry}))
    with pytest.raises(ValueError, match="dataset 'a': root 'clip.mp4' is a file, not a folder"):
        load_meta(tmp_path / "meta.json")


def test_text_image_and_multi_image_records(tmp_path, tiny_tokenizer):
    Image.new("RGB", (896, 448), (200, 10, 10)).save(tmp_path / "wide.png")
    Image.new("RGB", (448, 448), (10, 200, 10)).save(tmp_path / "square.jpg")
    records = [
        {"id": "text", "conversations": _turns("Say hi.", "Hi.")},
        {"id": "single", "image": "wide.png", "conversations": _turns("What colour?", "Red.")},
        {
            "id": "multi",
            "image": ["wide.png", "wide.png"],
            "conversations": _turns("Image-1: <image>\nImage-2: <image>\nSame?", "Yes."),
        },
    ]
    meta = _write_meta(tmp_path, {"mixed": records, "capped": records[1:2]}, capped={"max_dynamic_patch": 1})
    train, _ = build_datasets(meta, tiny_tokenizer, max_dynamic_patch=4)
    text, single, multi, capped = (train[i] for i in range(4))

    assert text["pixel_values"].shape == (1, 3, 448, 448) and text["image_flags"].tolist() == [0]
    assert _context_count(tiny_tokenizer, text) == 0
    assert torch.allclose(text["pixel_values"][0, :, 0, 0], text["pixel_values"][0, :, -1, -1])  # a white tile

    # 896x448 is a 2x1 grid, plus the thumbnail: 3 tiles, 768 image tokens, <image> prepended to the question.
    assert single["pixel_values"].shape[0] == 3 and single["image_flags"].tolist() == [1, 1, 1]
    assert _context_count(tiny_tokenizer, single) == 3 * 256
    assert "<|im_start|>user\n<img>" in tiny_tokenizer.decode(single["input_ids"])

    # Two images share max_dynamic_patch 4: at most 2 tiles each -> 2x1 grid, plus a thumbnail each.
    assert multi["pixel_values"].shape[0] == 6 and _context_count(tiny_tokenizer, multi) == 6 * 256

    # The entry's max_dynamic_patch 1 overrides the global 4: one tile, no thumbnail.
    assert capped["pixel_values"].shape[0] == 1 and _context_count(tiny_tokenizer, capped) == 256


def test_repeat_time(tmp_path, tiny_tokenizer):
    records = [{"id": str(i), "conversations": _turns(f"Question {i}?")} for i in range(4)]
    meta = _write_meta(
        tmp_path, {"twice": records, "half": records}, twice={"repeat_time": 2}, half={"repeat_time": 0.5}
    )
    train, _ = build_datasets(meta, tiny_tokenizer)
    assert len(train) == 8 + 2
    questions = [tiny_tokenizer.decode(train[i]["input_ids"]).split("Question ")[1][0] for i in (0, 4, 8, 9)]
    assert questions == ["0", "0", "0", "1"]  # repeated in order; the half keeps the first records


def _two_look_alike_folders(tmp_path):
    """``data/`` (with ``meta.json``) and ``work/`` (the working directory) both hold a ``clips/`` folder and a
    ``d.jsonl``, with different records: a relative path names an existing file from either folder."""
    for folder in ("data", "work"):
        (tmp_path / folder / "clips").mkdir(parents=True)
        (tmp_path / folder / "d.jsonl").write_text(json.dumps({"id": folder, "conversations": _turns("Hi?")}) + "\n")
    return tmp_path / "data" / "meta.json", tmp_path / "work"


@pytest.mark.parametrize("marked", [False, True], ids=["official", "paths_relative_to-meta_folder"])
def test_relative_paths_start_from_one_folder_only(tmp_path, monkeypatch, tiny_tokenizer, marked):
    meta_path, work = _two_look_alike_folders(tmp_path)
    monkeypatch.chdir(work)
    entry = {"root": "clips", "annotation": "d.jsonl", "data_augment": False, "repeat_time": 1}
    meta_path.write_text(json.dumps({"d": {**entry, **(FROM_META_FOLDER if marked else {})}}))
    # Both folders hold the names: the entry alone decides which one is read, never a search.
    base, other = (meta_path.parent, work) if marked else (work, meta_path.parent)
    (spec,) = load_meta(meta_path)
    assert (spec.root, spec.annotation) == (base / "clips", base / "d.jsonl")
    train, _ = build_datasets(meta_path, tiny_tokenizer)
    assert train.datasets[0].records[0].id == base.name

    # Gone from that folder: an error naming it and the fix, even though the other folder still has it.
    (base / "d.jsonl").unlink()
    if marked:
        expected = (
            f"dataset 'd': annotation 'd.jsonl' not found in the meta file's folder {base}, where this entry's "
            'relative paths start ("paths_relative_to": "meta_folder"); it is in the working directory: remove '
            '"paths_relative_to" from the entry'
        )
    else:
        expected = (
            f"dataset 'd': annotation 'd.jsonl' not found in the working directory {base}, where relative paths "
            "start (as in the official trainer); it is in the meta file's folder: add "
            '"paths_relative_to": "meta_folder" to the entry, or prepare again with --portable'
        )
    with pytest.raises(FileNotFoundError, match=re.escape(expected)):
        load_meta(meta_path)
    (other / "d.jsonl").unlink()
    fix = "fix the path" if marked else "run from the folder they are relative to (the one prepare ran in)"
    with pytest.raises(FileNotFoundError, match=re.escape("annotation 'd.jsonl' not found in the ")) as error:
        load_meta(meta_path)
    assert str(error.value).rsplit("; ", 1)[1].startswith(fix)


def test_an_unknown_paths_relative_to_is_refused(tmp_path):
    (tmp_path / "d.jsonl").write_text("")
    meta = {"d": {"root": ".", "annotation": "d.jsonl", "paths_relative_to": "home"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="dataset 'd': \"paths_relative_to\" must be \"meta_folder\".*got 'home'"):
        load_meta(tmp_path / "meta.json")


def test_meta_errors_name_the_problem(tmp_path, tiny_tokenizer):
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": "nowhere", "annotation": "d.jsonl"}}))
    with pytest.raises(FileNotFoundError, match="root 'nowhere' not found"):
        build_datasets(tmp_path / "meta.json", tiny_tokenizer)
    missing_root = str(tmp_path / "moved-away")
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": missing_root, "annotation": "d.jsonl"}}))
    with pytest.raises(FileNotFoundError, match=re.escape(f"root '{missing_root}' does not exist")):
        build_datasets(tmp_path / "meta.json", tiny_tokenizer)
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": ".", "annotation": "d.json"}}))
    with pytest.raises(ValueError, match="must be a .jsonl file"):
        build_datasets(tmp_path / "meta.json", tiny_tokenizer)
    (tmp_path / "d.jsonl").write_text('{"id": 1, "conversations": []}\n{broken\n')
    (tmp_path / "meta.json").write_text(json.dumps({"d": {"root": ".", "annotation": "d.jsonl", **FROM_META_FOLDER}}))
    with pytest.raises(ValueError, match="d.jsonl:2: not valid JSON"):
        build_datasets(tmp_path / "meta.json", tiny_tokenizer)
    _write_meta(tmp_path, {"only_val": [{"conversations": _turns("Hi?")}]})
    (tmp_path / "meta.json").write_text(
        json.dumps({"d_val": {"root": ".", "annotation": "only_val.jsonl", "repeat_time": 1, **FROM_META_FOLDER}})
    )
    with pytest.raises(ValueError, match="no training samples"):
        build_datasets(tmp_path / "meta.json", tiny_tokenizer)


def test_write_meta_writes_what_load_meta_reads(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "val.jsonl").write_text("")
    entries = {
        "clips_train": MetaEntry(
            root="clips", annotation="train.jsonl", length=12, max_dynamic_patch=1, repeat_time=2,
            paths_relative_to=META_FOLDER,
        ),
        "clips_val": MetaEntry(
            root=str(tmp_path / "clips"), annotation=str(tmp_path / "val.jsonl"), length=3, data_augment=True
        ),
    }  # fmt: skip
    write_meta(tmp_path / "meta.json", entries)
    written = json.loads((tmp_path / "meta.json").read_text())
    # The official keys in the official order, then ours; an unset max_dynamic_patch is left to the training flag.
    assert list(written["clips_train"]) == ["root", "annotation", "data_augment", "max_dynamic_patch", "repeat_time",
                                            "length", "paths_relative_to"]  # fmt: skip
    assert "max_dynamic_patch" not in written["clips_val"] and "paths_relative_to" not in written["clips_val"]
    train, val = load_meta(tmp_path / "meta.json")
    assert (train.name, train.root, train.annotation) == ("clips_train", tmp_path / "clips", tmp_path / "train.jsonl")
    assert (train.max_dynamic_patch, train.repeat_time, train.data_augment, train.is_eval) == (1, 2, False, False)
    assert (val.root, val.max_dynamic_patch, val.data_augment, val.is_eval) == (tmp_path / "clips", None, True, True)


def test_write_meta_refuses_what_load_meta_would(tmp_path):
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(ValueError, match="'annotation' must be a .jsonl file"):
        write_meta(tmp_path / "meta.json", {"d": MetaEntry(root=".", annotation="d.json", length=1)})
    with pytest.raises(ValueError, match="a 'repeat_time' above 1 must be a whole number"):
        write_meta(tmp_path / "meta.json", {"d": MetaEntry(root=".", annotation="d.jsonl", length=1, repeat_time=1.5)})
    with pytest.raises(ValueError, match="at least one dataset"):
        write_meta(tmp_path / "meta.json", {})
    assert (tmp_path / "meta.json").read_text() == "{}"  # nothing written


def test_bad_samples_in_dataloader_workers_reach_the_main_process(tmp_path, demo_videos_dir, tiny_tokenizer):
    (tmp_path / "broken.mp4").write_bytes(bytes(300))
    (tmp_path / "good.mp4").write_bytes((demo_videos_dir / "demo_000.mp4").read_bytes())
    records = [{"video": name, "conversations": _turns("<video>\nSummarize.")} for name in ("broken.mp4", "good.mp4")]
    train, _ = build_datasets(_write_meta(tmp_path, {"clips": records * 2}), tiny_tokenizer, **SMALL_VIDEO)
    loader = torch.utils.data.DataLoader(
        train, batch_size=2, num_workers=2, collate_fn=InternVLDataCollator(tiny_tokenizer.pad_token_id)
    )
    batches = list(loader)
    assert len(batches) == 2 and all(batch["input_ids"].shape[0] == 2 for batch in batches)
    assert train.bad_samples >= 2  # each broken record failed at least once, in a worker
