"""scripts/prepare_internvl3_finetuning.py on messy input: rejects with reasons, official output, a leak-free
deterministic split, byte-identical reruns, outputs published as a set (killed at every step), and one clear line
for every bad input or environment fault."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from internvl.data.prepare import PrepareError, prepare_dataset

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "prepare_internvl3_finetuning.py"
sys.path.insert(0, str(SCRIPT.parent))
import prepare_internvl3_finetuning as prepare_cli  # noqa: E402

OFFICIAL_META_KEYS = {"root", "annotation", "data_augment", "max_dynamic_patch", "repeat_time", "length"}
VERSION_FILES = ("video_summary_dataset_train.jsonl", "video_summary_dataset_val.jsonl", "rejected_records.jsonl")


def _write_csv(path: Path, rows: list[tuple[str, str]], header=("video", "summary")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _lying_video(path: Path) -> None:
    """An MP4 whose header announces 48 frames but whose data was cut: only some of them decode."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=12)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for _ in range(48):
            frame = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# Line numbers in annotations.csv (the header is line 1) -> expected rejection reason.
EXPECTED_REJECTS = {
    8: "video_not_found",
    9: "empty_summary",
    10: "not_a_video",
    11: "undecodable_video",
    12: "path_escapes_root",
    13: "duplicate",
    14: "missing_video_path",
}


@pytest.fixture(scope="module")
def messy_input(demo_videos_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("messy")
    videos = base / "videos"
    videos.mkdir()
    for index in range(5):
        shutil.copy(demo_videos_dir / f"demo_{index:03d}.mp4", videos / f"clip{index}.mp4")
    (videos / "notes.txt").write_text("not a video")
    data = (demo_videos_dir / "demo_005.mp4").read_bytes()
    (videos / "cut.mp4").write_bytes(data[: len(data) // 3])  # index at the end: unreadable once cut
    _lying_video(videos / "lying.mp4")
    shutil.copy(demo_videos_dir / "demo_005.mp4", base / "outside.mp4")
    rows = [
        ("clip0.mp4", "A red circle moves."),  # line 2
        ("clip1.mp4", "A blue square moves."),
        ("clip2.mp4", "A green triangle moves."),
        ("clip3.mp4", "Two shapes move."),
        ("clip0.mp4", "A circle crosses the frame."),  # same video, other summary: kept, same split
        ("lying.mp4", "Noise flickers."),
        ("missing.mp4", "Nothing."),  # line 8
        ("clip4.mp4", "   "),
        ("notes.txt", "Text."),
        ("cut.mp4", "Cut."),
        ("../outside.mp4", "Outside."),
        ("clip2.mp4", "A green triangle moves."),
        ("", "No video."),
    ]
    _write_csv(videos / "annotations.csv", rows)
    return videos


@pytest.fixture(scope="module")
def cli_run(messy_input, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("out") / "data"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--input",
            str(messy_input / "annotations.csv"),
            "--output-dir",
            str(output_dir),
            "--val-ratio",
            "0.4",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, output_dir


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _version_dir(output_dir: Path) -> Path:
    """The one version folder a finished run leaves."""
    (folder,) = output_dir.glob("prepared-*")
    return folder


def _annotation(output_dir: Path, part: str) -> Path:
    """The JSONL file meta.json names for the split ``part`` (train / val)."""
    entry = json.loads((output_dir / "meta.json").read_text())[f"video_summary_dataset_{part}"]
    return output_dir / entry["annotation"]


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too), by relative path, with its bytes."""
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_cli_rejects_bad_records_with_reasons(cli_run):
    result, output_dir = cli_run
    assert result.returncode == 0, result.stderr
    rejects = _read_jsonl(_version_dir(output_dir) / "rejected_records.jsonl")
    assert {r["source"]: r["reason"] for r in rejects} == {
        f"annotations.csv:{line}": reason for line, reason in EXPECTED_REJECTS.items()
    }
    assert all(r["detail"] for r in rejects)
    # One line per rejected record on the console, then the summary with counts per reason.
    for line, reason in EXPECTED_REJECTS.items():
        assert f"rejected annotations.csv:{line}: {reason}: " in result.stdout
    assert "kept 6 records (5 videos" in result.stdout
    assert "rejected 7 records" in result.stdout
    for reason in EXPECTED_REJECTS.values():
        assert f"  {reason}: 1" in result.stdout
    assert "videos that decode fewer frames than their container announces: 1 (largest gap: lying.mp4" in result.stdout
    assert f"(also listed in {_version_dir(output_dir) / 'rejected_records.jsonl'})" in result.stdout


def test_cli_writes_official_meta_and_records(cli_run, messy_input):
    _, output_dir = cli_run
    meta = json.loads((output_dir / "meta.json").read_text())
    assert list(meta) == ["video_summary_dataset_train", "video_summary_dataset_val"]
    records = {}
    for name, entry in meta.items():
        assert set(entry) == OFFICIAL_META_KEYS
        assert entry["annotation"] == f"{_version_dir(output_dir).name}/{name}.jsonl"
        assert (entry["data_augment"], entry["max_dynamic_patch"], entry["repeat_time"]) == (False, 1, 1)
        assert (output_dir / entry["root"]).resolve() == messy_input.resolve()
        records[name] = _read_jsonl(output_dir / entry["annotation"])
        assert entry["length"] == len(records[name])
    train, val = records["video_summary_dataset_train"], records["video_summary_dataset_val"]
    assert len(train) + len(val) == 6 and len(val) >= 1
    for record in train + val:
        assert (messy_input / record["video"]).is_file()
        human, gpt = record["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<video>\n")
        assert gpt["from"] == "gpt" and gpt["value"]
        assert record["fps"] == 12.0 and record["decoded_frames"] >= 1
    lying = next(record for record in train + val if record["video"] == "lying.mp4")
    assert 1 <= lying["decoded_frames"] < 48
    # No video in both splits: clip0 has two summaries, and both land together.
    assert not {r["video"] for r in train} & {r["video"] for r in val}
    ids = [r["id"] for r in train + val]
    assert len(set(ids)) == len(ids) and "clip0.mp4#2" in ids


def test_prepared_data_feeds_the_dataset_and_the_model(cli_run, tiny_model_dir, tiny_tokenizer):
    import torch

    from internvl.data import InternVLDataCollator, build_datasets
    from internvl.model import load_internvl_model

    _, output_dir = cli_run
    train, evaluation = build_datasets(output_dir / "meta.json", tiny_tokenizer, min_num_frame=2, max_num_frame=3)
    for dataset in (train, evaluation):
        for index in range(len(dataset)):
            sample = dataset[index]
            frames = sample["pixel_values"].shape[0]
            assert 2 <= frames <= 3
    assert train.bad_samples == 0 and evaluation.bad_samples == 0

    # A batch of the prepared data goes through the tiny model: image tokens and frames agree, the answer is trained.
    batch = InternVLDataCollator(tiny_tokenizer.pad_token_id)([train[0], train[1]])
    model = load_internvl_model(tiny_model_dir, load_in_4bit=False, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss) and loss > 0


def _split(output_dir: Path) -> tuple[set, set]:
    return tuple({r["id"] for r in _read_jsonl(_annotation(output_dir, part))} for part in ("train", "val"))


def test_split_is_deterministic_and_independent_of_input_order(demo_videos_dir, tmp_path):
    rows = list(csv.reader(open(demo_videos_dir / "annotations.csv")))[1:]
    forward = _write_csv(tmp_path / "forward.csv", rows)
    backward = _write_csv(tmp_path / "backward.csv", rows[::-1])
    shutil.copytree(demo_videos_dir, tmp_path, dirs_exist_ok=True)
    splits = {}
    for seed in range(4):
        prepare_dataset(forward, tmp_path / f"f{seed}", val_ratio=0.5, seed=seed, progress=False)
        prepare_dataset(backward, tmp_path / f"b{seed}", val_ratio=0.5, seed=seed, progress=False)
        splits[seed] = _split(tmp_path / f"f{seed}")
        assert splits[seed] == _split(tmp_path / f"b{seed}")
        assert len(splits[seed][1]) == 3 and not splits[seed][0] & splits[seed][1]
    assert len({frozenset(val) for _, val in splits.values()}) > 1, "different seeds should give different splits"


def test_rerun_is_byte_identical(messy_input, tmp_path):
    output_dir = tmp_path / "out"
    prepare_dataset(messy_input / "annotations.csv", output_dir, progress=False)
    first = _tree(output_dir)
    prepare_dataset(messy_input / "annotations.csv", output_dir, progress=False)
    assert _tree(output_dir) == first
    # meta.json, its version folder and the lock file; no temporary file left behind.
    version = _version_dir(output_dir).name
    assert sorted(first) == sorted(
        ["meta.json", ".prepare.lock", *(f"{version}/{name}" for name in VERSION_FILES)]
    )


def test_strict_mode_fails_and_writes_nothing(messy_input, tmp_path, capsys):
    output_dir = tmp_path / "out"
    code = prepare_cli.main(
        ["--input", str(messy_input / "annotations.csv"), "--output-dir", str(output_dir), "--strict", "--no-progress"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert "rejected annotations.csv:8: video_not_found" in err and "--strict" in err
    assert not output_dir.exists() or not any(output_dir.iterdir())


def test_no_arguments_and_no_data_explains_what_to_provide(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert prepare_cli.main([]) == 2
    err = capsys.readouterr().err
    assert "internvl3_data/raw" in err and "scripts/make_demo_data.py" in err and "--input" in err


def test_no_arguments_reads_the_default_folder(demo_videos_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(demo_videos_dir, tmp_path / "internvl3_data" / "raw")
    assert prepare_cli.main(["--no-progress"]) == 0
    meta = json.loads((tmp_path / "internvl3_data" / "meta.json").read_text())
    assert meta["video_summary_dataset_train"]["root"] == "raw"
    assert "kept 6 records" in capsys.readouterr().out


def test_folder_of_videos_with_txt_summaries(demo_videos_dir, tmp_path):
    folder = tmp_path / "raw"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(demo_videos_dir / "demo_000.mp4", folder / "a.mp4")
    (folder / "a.txt").write_text("A shape moves.\n")
    shutil.copy(demo_videos_dir / "demo_001.mp4", folder / "sub" / "b.mp4")
    (folder / "sub" / "b.txt").write_text("Two shapes move.")
    shutil.copy(demo_videos_dir / "demo_002.mp4", folder / "no_summary.mp4")
    (folder / "orphan.txt").write_text("A summary without its video.")
    report = prepare_dataset(folder, tmp_path / "out", val_ratio=0, progress=False)
    assert sorted(r.video for r in report.kept) == ["a.mp4", "sub/b.mp4"]
    assert {(r.source, r.reason) for r in report.rejected} == {
        ("no_summary.mp4", "missing_summary_file"),
        ("orphan.txt", "video_not_found"),
    }
    train = _read_jsonl(_annotation(tmp_path / "out", "train"))
    assert [r["conversations"][1]["value"] for r in train] == ["A shape moves.", "Two shapes move."]


def test_json_and_jsonl_inputs_with_aliases_and_overrides(demo_videos_dir, tmp_path):
    shutil.copytree(demo_videos_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "list.json").write_text(json.dumps([{"video_path": "demo_000.mp4", "caption": "A shape moves."}]))
    report = prepare_dataset(tmp_path / "list.json", tmp_path / "out1", val_ratio=0, progress=False)
    assert [r.summary for r in report.kept] == ["A shape moves."]

    (tmp_path / "lines.jsonl").write_text(json.dumps({"clip_name": "demo_001.mp4", "ref": "Shapes move."}) + "\n")
    with pytest.raises(PrepareError, match="no video field found among clip_name, ref.*--video-key"):
        prepare_dataset(tmp_path / "lines.jsonl", tmp_path / "out2", progress=False)
    report = prepare_dataset(
        tmp_path / "lines.jsonl",
        tmp_path / "out2",
        video_key="clip_name",
        summary_key="ref",
        val_ratio=0,
        progress=False,
    )
    assert [r.video for r in report.kept] == ["demo_001.mp4"]


def test_video_root_resolves_relative_paths(demo_videos_dir, tmp_path):
    annotations = tmp_path / "labels" / "annotations.csv"
    annotations.parent.mkdir()
    _write_csv(annotations, [("demo_000.mp4", "A shape moves."), ("sub/../demo_001.mp4", "Shapes move.")])
    # By default relative paths start from the annotation file's folder, where these videos are not.
    with pytest.raises(PrepareError, match="all 2 were rejected") as error:
        prepare_dataset(annotations, tmp_path / "out", progress=False)
    assert [r.reason for r in error.value.rejected] == ["video_not_found"] * 2

    argv = ["--input", str(annotations), "--output-dir", str(tmp_path / "out"), "--no-progress"]
    assert prepare_cli.main([*argv, "--video-root", str(demo_videos_dir), "--val-ratio", "0"]) == 0
    entry = json.loads((tmp_path / "out" / "meta.json").read_text())["video_summary_dataset_train"]
    assert (tmp_path / "out" / entry["root"]).resolve() == demo_videos_dir.resolve()
    records = _read_jsonl(tmp_path / "out" / entry["annotation"])
    assert [r["video"] for r in records] == ["demo_000.mp4", "demo_001.mp4"]


def test_non_text_fields_are_rejected(demo_videos_dir, tmp_path):
    shutil.copytree(demo_videos_dir, tmp_path, dirs_exist_ok=True)
    records = [
        {"video": "demo_000.mp4", "summary": ["A shape", "moves."]},
        {"video": {"path": "demo_001.mp4"}, "summary": "A shape moves."},
        {"video": "demo_002.mp4", "summary": 42},  # a number is text enough
    ]
    (tmp_path / "list.json").write_text(json.dumps(records))
    report = prepare_dataset(tmp_path / "list.json", tmp_path / "out", val_ratio=0, progress=False)
    assert [(r.source, r.reason, r.detail) for r in report.rejected] == [
        ("list.json[0]", "not_text", "the summary is a list, not text"),
        ("list.json[1]", "not_text", "the video path is an object, not text"),
    ]
    assert [(r.video, r.summary) for r in report.kept] == [("demo_002.mp4", "42")]


def test_unusable_input_is_an_error_naming_the_place(demo_videos_dir, tmp_path):
    shutil.copy(demo_videos_dir / "demo_000.mp4", tmp_path / "a.mp4")
    good_line = json.dumps({"video": "a.mp4", "summary": "A shape moves."}) + "\n"
    (tmp_path / "lines.jsonl").write_text(good_line + "\n" + '{"video": "a.mp4", summary}\n')
    with pytest.raises(PrepareError, match=r"lines.jsonl:3: not valid JSON"):
        prepare_dataset(tmp_path / "lines.jsonl", tmp_path / "out", progress=False)
    (tmp_path / "lines.jsonl").write_text(good_line)
    (tmp_path / "taken").write_text("a file where the output folder should go")
    with pytest.raises(PrepareError, match="output folder .*taken is a file"):
        prepare_dataset(tmp_path / "lines.jsonl", tmp_path / "taken", progress=False)
    assert not (tmp_path / "out").exists()


def test_system_prompt_prompt_and_absolute_root(demo_videos_dir, tmp_path):
    output_dir = tmp_path / "out"
    prepare_dataset(
        demo_videos_dir / "annotations.csv",
        output_dir,
        prompt="Describe it.",
        system_prompt="You are a video summarizer.",
        absolute_root=True,
        progress=False,
    )
    meta = json.loads((output_dir / "meta.json").read_text())
    entry = meta["video_summary_dataset_train"]
    assert Path(entry["root"]) == demo_videos_dir.resolve() and Path(entry["annotation"]).is_absolute()
    record = _read_jsonl(Path(entry["annotation"]))[0]
    assert record["conversations"][0] == {"from": "system", "value": "You are a video summarizer."}
    assert record["conversations"][1]["value"] == "<video>\nDescribe it."


def test_extracted_frames_are_an_official_frame_folder(demo_videos_dir, tmp_path, tiny_tokenizer):
    from internvl.data import build_datasets

    output_dir = tmp_path / "out"
    prepare_dataset(demo_videos_dir / "annotations.csv", output_dir, extract=True, num_frames=4, progress=False)
    meta = json.loads((output_dir / "meta.json").read_text())
    # The frames are part of the version: the root is its folder.
    assert meta["video_summary_dataset_train"]["root"] == _version_dir(output_dir).name
    record = _read_jsonl(_annotation(output_dir, "train"))[0]
    assert record["video"] == f"frames/{Path(record['source_video']).stem}_mp4/"
    assert record["extracted_frames"] == 4 and record["decoded_frames"] == 24
    frames = sorted(os.listdir(_version_dir(output_dir) / record["video"]))
    # Segment middles of 24 frames in 4 segments, named <folder>_<frame index>.jpg.
    assert frames == [f"{Path(record['source_video']).stem}_mp4_{i:06d}.jpg" for i in (2, 8, 14, 20)]
    train, _ = build_datasets(output_dir / "meta.json", tiny_tokenizer, min_num_frame=2, max_num_frame=8)
    assert 2 <= train[0]["pixel_values"].shape[0] <= 4  # never more frames than the folder holds


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from internvl.data.files import atomic_path, atomic_write_text

    target = tmp_path / "meta.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp_file:
            tmp_file.write_text("half of the new cont")
            raise RuntimeError("killed while writing")
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["meta.json"]


def test_folder_replacement_is_all_or_nothing(tmp_path):
    from internvl.data.files import atomic_directory

    target = tmp_path / "frames"
    with atomic_directory(target) as staging:
        (staging / "old.jpg").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "new.jpg").write_text("half")
            raise RuntimeError("killed while writing")
    assert os.listdir(target) == ["old.jpg"]
    with atomic_directory(target) as staging:
        (staging / "new.jpg").write_text("new")
    assert os.listdir(target) == ["new.jpg"]
    assert os.listdir(tmp_path) == ["frames"]  # no staging or old folder left behind
    (tmp_path / "a_file").write_text("data")
    with pytest.raises(NotADirectoryError, match="a_file is a file"):
        with atomic_directory(tmp_path / "a_file"):
            pass
    assert (tmp_path / "a_file").read_text() == "data"
