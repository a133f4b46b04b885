"""scripts/prepare_internvl3_finetuning.py on messy input: rejects with reasons, official output, a leak-free
deterministic split, byte-identical reruns, outputs published as a set (killed at every step), and one clear line
for every bad input or environment fault."""

from __future__ import annotations

import csv
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from internvl.data.dataset import load_meta
from internvl.data.prepare import PrepareError, prepare_dataset
from tests.media import write_noise_video
from tests.prepared import TRAIN, VAL, annotation_path

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
    data = write_noise_video(path, 48, faststart=True).read_bytes()
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
    (folder,) = (path for path in output_dir.iterdir() if re.fullmatch("prepared-[0-9a-f]{12}", path.name))
    return folder


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
        # Absolute --input and --output-dir: absolute paths (see test_meta_json_opens_the_official_way).
        assert entry["annotation"] == str(_version_dir(output_dir) / f"{name}.jsonl")
        assert (entry["data_augment"], entry["max_dynamic_patch"], entry["repeat_time"]) == (False, 1, 1)
        assert entry["root"] == str(messy_input)
        records[name] = _read_jsonl(Path(entry["annotation"]))
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
    return tuple({r["id"] for r in _read_jsonl(annotation_path(output_dir, part))} for part in (TRAIN, VAL))


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


# -- meta.json as the official trainer opens it ----------------------------------------------------------------------


def _open_the_official_way(meta_path: Path | str) -> list[str]:
    """Every annotation and video ``meta_path`` names, opened as the official trainer opens them (relative paths
    start from the working directory): ``open(entry["annotation"])``, ``os.path.join(entry["root"],
    record["video"])``. Returns the video paths; fails on one that does not open."""
    with open(meta_path) as f:
        meta = json.loads(f.read())
    videos = []
    for entry in meta.values():
        with open(entry["annotation"]) as f:
            records = [json.loads(line) for line in f.readlines()]
        assert len(records) == entry["length"] and entry["repeat_time"] == 1 and entry["data_augment"] is False
        for record in records:
            video = os.path.join(entry["root"], record["video"])
            if video.endswith("/"):  # a frame folder, listed for its "<name>_<index>.jpg" files
                assert [name for name in os.listdir(video) if re.search(r"_(\d+)\.jpg$", name)], video
            else:
                with open(video, "rb") as f:
                    assert f.read(12)[4:8] == b"ftyp", video  # the MP4 itself
            videos.append(video)
    return videos


@pytest.fixture
def workspace(demo_videos_dir, tmp_path, monkeypatch):
    """A working directory holding ``videos/`` (3 clips and their annotations.csv), where prepare runs."""
    rows = list(csv.reader(open(demo_videos_dir / "annotations.csv")))[1:4]
    (tmp_path / "videos").mkdir()
    for video, _ in rows:
        shutil.copy(demo_videos_dir / video, tmp_path / "videos" / video)
    _write_csv(tmp_path / "videos" / "annotations.csv", rows)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("extract", [False, True], ids=["videos", "extracted-frames"])
@pytest.mark.parametrize("output_dir", ["internvl3_data", "absolute"], ids=["relative-output", "absolute-output"])
@pytest.mark.parametrize("video_root", ["videos", "absolute"], ids=["relative-root", "absolute-root"])
def test_meta_json_opens_the_official_way(workspace, monkeypatch, video_root, output_dir, extract):
    video_root = str(workspace / "videos") if video_root == "absolute" else video_root
    output_dir = str(workspace / "data") if output_dir == "absolute" else output_dir
    argv = ["--input", "videos/annotations.csv", "--video-root", video_root, "--output-dir", output_dir]
    assert prepare_cli.main([*argv, "--val-ratio", "0.34", "--no-progress", *(["--extract-frames"] * extract)]) == 0
    meta_path = Path(output_dir) / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert list(meta) == [TRAIN, VAL]
    # An absolute option stays absolute, a relative one relative to the working directory: the official convention.
    for entry in meta.values():
        assert entry["root"] == (f"{output_dir}/{_version_dir(Path(output_dir)).name}" if extract else video_root)
        assert entry["annotation"].startswith(f"{output_dir}/prepared-")

    # From the folder prepare ran in, the official reader finds every annotation and video, and ours the same ones.
    videos = _open_the_official_way(meta_path)
    assert len(videos) == 3
    specs = load_meta(meta_path)
    assert [(spec.root, spec.annotation) for spec in specs] == [
        (Path(os.path.abspath(entry["root"])), Path(os.path.abspath(entry["annotation"]))) for entry in meta.values()
    ]

    # From elsewhere, relative paths name nothing, for the official reader and ours alike; absolute ones still work.
    (workspace / "elsewhere").mkdir()
    monkeypatch.chdir(workspace / "elsewhere")
    meta_path = workspace / meta_path
    if all(os.path.isabs(entry[key]) for entry in meta.values() for key in ("root", "annotation")):
        assert len(_open_the_official_way(meta_path)) == 3 and load_meta(meta_path) == specs
    else:
        with pytest.raises(FileNotFoundError):
            _open_the_official_way(meta_path)
        with pytest.raises(FileNotFoundError, match=f"not found in the working directory {workspace / 'elsewhere'}"):
            load_meta(meta_path)


@pytest.mark.parametrize("extract", [False, True], ids=["videos", "extracted-frames"])
def test_portable_meta_json_moves_with_its_folder(workspace, monkeypatch, capsys, extract):
    argv = ["--input", "videos/annotations.csv", "--output-dir", "data/prepared", "--portable", "--no-progress"]
    assert prepare_cli.main([*argv, "--val-ratio", "0.34", *(["--extract-frames"] * extract)]) == 0
    assert "paths in meta.json are relative to its folder (--portable)" in capsys.readouterr().out
    meta = json.loads(Path("data/prepared/meta.json").read_text())
    for entry in meta.values():
        assert entry["paths_relative_to"] == "meta_folder" and entry["annotation"].startswith("prepared-")
        assert entry["root"] == (_version_dir(workspace / "data" / "prepared").name if extract else "../../videos")

    # The videos and the data move together; ours reads them from any working directory.
    shutil.move(workspace / "videos", workspace / "moved" / "videos")
    shutil.move(workspace / "data", workspace / "moved" / "data")
    moved_meta = workspace / "moved" / "data" / "prepared" / "meta.json"
    specs = load_meta(moved_meta)
    assert {spec.annotation.parent for spec in specs} == {_version_dir(moved_meta.parent)}
    assert all(spec.root.is_relative_to(workspace / "moved") for spec in specs)
    # The official trainer, which ignores the marker, reads it when started in that folder.
    monkeypatch.chdir(moved_meta.parent)
    assert len(_open_the_official_way("meta.json")) == 3


def test_prepare_says_where_relative_paths_start(workspace, capsys):
    assert prepare_cli.main(["--input", "videos/annotations.csv", "--val-ratio", "0", "--no-progress"]) == 0
    assert (
        f"paths in meta.json are relative to the working directory {workspace}, as the official trainer reads them: "
        "start the training there (or prepare with --portable for a folder that can move)"
    ) in capsys.readouterr().out
    argv = ["--input", str(workspace / "videos"), "--output-dir", str(workspace / "data"), "--val-ratio", "0"]
    assert prepare_cli.main([*argv, "--no-progress"]) == 0
    assert "paths in meta.json are relative" not in capsys.readouterr().out  # every path is absolute
    assert prepare_cli.main(["--input", "videos", "--absolute-root", "--portable", "--no-progress"]) == 1
    assert "error: --absolute-root and --portable exclude each other" in capsys.readouterr().err


# -- Publishing: the outputs change as a set -------------------------------------------------------------------------

# File-system calls that change what is on disk: a kill can come between any two of them.
DISK_CHANGES = ("mkdir", "replace", "rename", "unlink", "rmdir", "fsync")


class _Killed(BaseException):
    """Stands for SIGKILL: nothing catches it (it is not an Exception)."""


def _run_killed_at(step: int, output_dir: Path, snapshot: Path, run) -> bool:
    """Run ``run()`` until just before its ``step``-th disk change, copy ``output_dir`` to ``snapshot`` as a kill at
    that moment leaves it (before any cleanup code could run), and stop the run. False if ``run`` finished first."""
    calls = 0
    with pytest.MonkeyPatch.context() as patch:

        def counted(name, real):
            def call(*args, **kwargs):
                nonlocal calls
                calls += 1
                if calls == step:
                    patch.undo()
                    if output_dir.exists():
                        shutil.copytree(output_dir, snapshot, symlinks=True)
                    raise _Killed
                return real(*args, **kwargs)

            return call

        for name in DISK_CHANGES:
            patch.setattr(os, name, counted(name, getattr(os, name)))
        try:
            run()
        except _Killed:
            return True
    return False


def _published(output_dir: Path) -> dict[str, bytes] | None:
    """What meta.json names, read through it: meta.json itself and every file (frames too) under the roots and
    annotations it points into the output folder; None without a meta.json. Fails on a dangling name."""
    meta_path = output_dir / "meta.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    published = {"meta.json": meta_path.read_bytes()}
    for entry in meta.values():
        annotation = output_dir / entry["annotation"]
        records = _read_jsonl(annotation)
        assert entry["length"] == len(records)
        published[entry["annotation"]] = annotation.read_bytes()
        for record in records:
            media = output_dir / entry["root"] / record["video"]
            assert media.exists(), f"meta.json names {media}, which is missing"
            if media.is_dir():
                published.update({str(path.relative_to(output_dir)): path.read_bytes() for path in media.iterdir()})
    return published


@pytest.mark.parametrize("extract", [False, True], ids=["videos", "extracted-frames"])
@pytest.mark.parametrize("previous_run", [True, False], ids=["over-a-previous-run", "first-run"])
def test_a_kill_at_any_step_leaves_a_complete_set(demo_videos_dir, tmp_path, previous_run, extract):
    rows = list(csv.reader(open(demo_videos_dir / "annotations.csv")))[1:4]  # 3 videos keep the steps few
    annotations = _write_csv(tmp_path / "annotations.csv", rows)
    # Portable: the kill snapshots are copies of the output folder, read through their own meta.json.
    options = dict(video_root=demo_videos_dir, extract=extract, num_frames=2, portable=True, progress=False)
    output_dir, previous_dir = tmp_path / "out", tmp_path / "previous"

    def new():  # another split and another prompt: every file of the set changes
        prepare_dataset(annotations, output_dir, val_ratio=0.34, seed=5, prompt="Describe the video.", **options)

    # The two complete sets, and the folder as a finished new run leaves it.
    prepare_dataset(annotations, previous_dir, val_ratio=0.5, seed=0, **options)
    old_set = _published(previous_dir)
    new()
    new_set, finished = _published(output_dir), _tree(output_dir)
    assert old_set["meta.json"] != new_set["meta.json"]

    kills = 0
    for step in range(1, 100):
        shutil.rmtree(output_dir, ignore_errors=True)
        if previous_run:
            shutil.copytree(previous_dir, output_dir)
        snapshot = tmp_path / f"killed-{step}"
        if not _run_killed_at(step, output_dir, snapshot, new):
            break
        kills += 1
        killed = _published(snapshot) if snapshot.exists() else None
        allowed = [old_set, new_set] if previous_run else [None, new_set]
        assert killed in allowed, f"killed before disk change {step}: meta.json names a mixed or partial set"
        # The next run over what the kill left finishes as a clean run does: leftovers are removed.
        shutil.rmtree(output_dir, ignore_errors=True)
        if snapshot.exists():
            shutil.move(snapshot, output_dir)
        new()
        assert _tree(output_dir) == finished, f"rerun after a kill before disk change {step}"
    assert kills >= 15, kills  # the run has that many steps: the kills really came between them


def test_older_versions_and_leftovers_are_removed_and_nothing_else(demo_videos_dir, tmp_path):
    output_dir = tmp_path / "out"
    (output_dir / "raw").mkdir(parents=True)  # the default layout keeps the input videos inside the output folder
    (output_dir / "raw" / "clip.mp4").write_bytes(b"user data")
    (output_dir / "notes.txt").write_text("user notes")
    (output_dir / "prepared-by-hand").mkdir()
    prepare_dataset(demo_videos_dir / "annotations.csv", output_dir, seed=0, progress=False)
    first = _version_dir(output_dir).name
    (output_dir / f".{first}.abc123.tmp").mkdir()  # what a killed run leaves: a staging folder, a meta.json temp
    (output_dir / ".meta.json.xyz789.tmp").write_text("{")
    report = prepare_dataset(demo_videos_dir / "annotations.csv", output_dir, seed=1, val_ratio=0.5, progress=False)
    assert report.version_dir.name != first
    assert sorted(path.name for path in output_dir.iterdir()) == sorted(
        [".prepare.lock", "meta.json", "notes.txt", "prepared-by-hand", "raw", report.version_dir.name]
    )
    assert (output_dir / "raw" / "clip.mp4").read_bytes() == b"user data"


def test_a_run_into_a_folder_another_run_is_writing_is_refused(demo_videos_dir, tmp_path):
    from internvl.data.files import exclusive_lock

    output_dir = tmp_path / "out"
    prepare_dataset(demo_videos_dir / "annotations.csv", output_dir, progress=False)
    before = _tree(output_dir)
    with exclusive_lock(output_dir / ".prepare.lock"):
        with pytest.raises(PrepareError, match=r"another prepare run is writing to .*out; wait for it"):
            prepare_dataset(demo_videos_dir / "annotations.csv", output_dir, seed=3, progress=False)
    assert _tree(output_dir) == before
    prepare_dataset(demo_videos_dir / "annotations.csv", output_dir, seed=3, progress=False)  # released


@pytest.mark.parametrize(
    ("error_number", "message"),
    [
        (errno.ENOSPC, "No space left on device; free space on that disk or pass another --output-dir"),
        (errno.EROFS, "Read-only file system; the folder is not writable: pass another --output-dir"),
    ],
)
def test_a_full_or_read_only_disk_is_one_line_and_changes_nothing(
    demo_videos_dir, tmp_path, monkeypatch, capsys, error_number, message
):
    output_dir = tmp_path / "out"
    prepare_dataset(demo_videos_dir / "annotations.csv", output_dir, progress=False)
    before = _tree(output_dir)
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd):  # the disk fails as the second file of the new set is flushed
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(error_number, os.strerror(error_number))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    argv = ["--input", str(demo_videos_dir / "annotations.csv"), "--output-dir", str(output_dir), "--no-progress"]
    assert prepare_cli.main([*argv, "--seed", "4"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot write ")
    assert message in err and "previous outputs" in err
    monkeypatch.undo()
    assert _tree(output_dir) == before  # the old set, and no temporary file


@pytest.mark.parametrize(
    ("fault", "code", "line"),
    [
        (KeyboardInterrupt(), 130, "interrupted: {out}/meta.json names a complete set, the previous one unless"),
        (PermissionError(errno.EACCES, "Permission denied", "clip.mp4"), 1, "error: [Errno 13] Permission denied"),
    ],
    ids=["ctrl-c", "os-error"],
)
def test_the_cli_answers_an_interruption_or_an_os_error_in_one_line(tmp_path, monkeypatch, capsys, fault, code, line):
    def failing(*args, **kwargs):
        raise fault

    monkeypatch.setattr(prepare_cli, "prepare_dataset", failing)
    assert prepare_cli.main(["--input", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line.format(out=tmp_path / "out"))


def test_an_unwritable_output_folder_is_refused_before_decoding(demo_videos_dir, tmp_path, monkeypatch):
    import internvl.data.prepare as prepare

    def no_decoding(*args, **kwargs):
        raise AssertionError("a video was decoded before the output folder was checked")

    monkeypatch.setattr(prepare, "probe_video", no_decoding)
    (tmp_path / "a_file").write_text("data")
    with pytest.raises(PrepareError, match=r"output folder .*a_file/data cannot be created: .*a_file is a file"):
        prepare_dataset(demo_videos_dir / "annotations.csv", tmp_path / "a_file" / "data", progress=False)
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    # As root (CI containers) permissions do not stop writes: the check asks access(2), which is what it sees.
    monkeypatch.setattr(prepare.os, "access", lambda path, mode: Path(path) != read_only)
    with pytest.raises(PrepareError, match=r"output folder .*read_only/data: .*read_only is not writable"):
        prepare_dataset(demo_videos_dir / "annotations.csv", read_only / "data", progress=False)
    assert os.listdir(read_only) == [] and (tmp_path / "a_file").read_text() == "data"


def test_an_empty_split_gets_no_meta_entry(demo_videos_dir, tmp_path, capsys):
    from internvl.data import build_datasets
    from internvl.data.dataset import has_eval_records

    argv = ["--input", str(demo_videos_dir / "annotations.csv"), "--no-progress", "--val-ratio", "0"]
    assert prepare_cli.main([*argv, "--output-dir", str(tmp_path / "no_val")]) == 0
    out = capsys.readouterr().out
    assert "val: none (--val-ratio 0): meta.json has no video_summary_dataset_val entry" in out
    meta = json.loads((tmp_path / "no_val" / "meta.json").read_text())
    assert list(meta) == ["video_summary_dataset_train"] and meta["video_summary_dataset_train"]["length"] == 6
    assert not (_version_dir(tmp_path / "no_val") / "video_summary_dataset_val.jsonl").exists()
    # So the launcher does not switch evaluation on, and training builds no evaluation set.
    assert not has_eval_records(tmp_path / "no_val" / "meta.json")

    one_video = _write_csv(tmp_path / "one.csv", [("demo_000.mp4", "A shape moves."), ("demo_000.mp4", "It moves.")])
    report = prepare_dataset(one_video, tmp_path / "one", video_root=demo_videos_dir, val_ratio=0.5, progress=False)
    assert list(json.loads((tmp_path / "one" / "meta.json").read_text())) == ["video_summary_dataset_train"]
    assert "val: none (a single video cannot be split)" in "\n".join(report.summary_lines())


def test_summaries_too_long_for_any_sample_are_warned_about(demo_videos_dir, tmp_path, capsys):
    csv_path = _write_csv(
        tmp_path / "long.csv",
        [
            ("demo_000.mp4", "A shape moves. " * 6700),  # 100,499 characters once stripped: about 25,000 tokens
            ("demo_001.mp4", "Two shapes move across the frame. " * 60),  # 2,040 characters: a long, usable one
            ("demo_002.mp4", "A shape moves."),
        ],
    )
    argv = ["--input", str(csv_path), "--video-root", str(demo_videos_dir), "--no-progress", "--val-ratio", "0"]
    assert prepare_cli.main([*argv, "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    # 8192 tokens - 8 frames x 264 - the system message and the prompt: about 6,000 left for the summary.
    warnings = [line for line in out.splitlines() if line.startswith("warning ")]
    assert len(warnings) == 1 and warnings[0].startswith(
        "warning long.csv:2: the summary is about 25,125 tokens (100,499 characters), more than the about 6,0"
    )
    assert "training cannot use this record and will skip it: shorten the summary, or raise max_seq_length" in out
    assert "summaries too long for any training sample: 1 (longest: long.csv:2, about 25,125 tokens" in out
    assert "kept 3 records" in out  # a warning, not a rejection
    # The threshold follows the training's settings: the sample length, and the fewest frames next to the summary.
    options = dict(video_root=demo_videos_dir, val_ratio=0, progress=False)
    report = prepare_dataset(csv_path, tmp_path / "out", max_seq_length=2560, **options)
    assert [long.source for long in report.long_summaries] == ["long.csv:2", "long.csv:3"]
    report = prepare_dataset(csv_path, tmp_path / "out", max_seq_length=2048, min_num_frame=4, **options)
    assert [long.source for long in report.long_summaries] == ["long.csv:2"]
    with pytest.raises(PrepareError, match="--max-seq-length 2048 leaves no room for a summary next to 8 frames"):
        prepare_dataset(csv_path, tmp_path / "out", max_seq_length=2048, **options)


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
    entry = meta["video_summary_dataset_train"]
    assert entry["root"] == "internvl3_data/raw" and entry["annotation"].startswith("internvl3_data/prepared-")
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
    train = _read_jsonl(annotation_path(tmp_path / "out"))
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


# -- Input that would lose or mangle data ----------------------------------------------------------------------------


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_an_unquoted_comma_rejects_the_row_naming_its_line(demo_videos_dir, tmp_path, capsys):
    csv_path = _write_bytes(
        tmp_path / "annotations.csv",
        b"video,summary\n"
        b"demo_000.mp4,A man walks in, then sits\n"
        b'demo_001.mp4,"A man walks in, then sits"\n'
        b"demo_002.mp4,A shape moves.,\n",  # a trailing empty field (spreadsheet export) loses nothing
    )
    argv = ["--input", str(csv_path), "--video-root", str(demo_videos_dir), "--no-progress", "--val-ratio", "0"]
    assert prepare_cli.main([*argv, "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert (
        "rejected annotations.csv:2: extra_fields: 3 fields where the header has 2: a comma inside an unquoted field "
        "splits it (the summary would be cut to 'A man walks in'); put the field in double quotes"
    ) in out
    assert "rejected 1 records\n  extra_fields: 1" in out
    train = _read_jsonl(annotation_path(tmp_path / "out"))
    assert [r["conversations"][1]["value"] for r in train] == ["A man walks in, then sits", "A shape moves."]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        # An opening quote never closed: every later row would be one summary.
        (
            b'video,summary\ndemo_000.mp4,A shape moves.\ndemo_001.mp4,"Two shapes\ndemo_002.mp4,A shape moves.\n',
            r"annotations.csv:3: a quoted field opens on this line and is never closed, so lines 3-4 would be one "
            r'field; close the quote \(a quote inside a field is written as two \(""\)\)',
        ),
        # Closed only rows later: the rows between become text of the summary.
        (
            b'video,summary\ndemo_000.mp4,"A shape\ndemo_001.mp4,Two shapes."\ndemo_002.mp4,A shape moves.\n',
            r"annotations.csv:2: a quoted field opens on this line and runs to line 3, taking in line 3 "
            r"\('demo_001.mp4,Two shapes.'\) as text; close the quote where the field ends",
        ),
        # Runs into the next quoted field, which then looks like a quote in the middle of a field.
        (
            b'video,summary\ndemo_000.mp4,"A shape\ndemo_001.mp4,"Two shapes."\n',
            r"annotations.csv:2: a quoted field opens on this line and runs to line 3, where a quote ends it in the "
            r"middle; close the quote on line 2",
        ),
        (
            b'video,summary\ndemo_000.mp4,"He said "hi" twice"\n',
            r"annotations.csv:2: a quote ends a quoted field in the middle .*; a quote inside a field is written as "
            r'two \(""\)',
        ),
        (b"video;summary\ndemo_000.mp4;A shape moves.\n", r"the file is semicolon-separated, and CSV input must be"),
        (b"video\tsummary\ndemo_000.mp4\tA shape moves.\n", r"the file is tab-separated, and CSV input must be comma"),
        (b"\xff\xfev\x00i\x00d\x00e\x00o\x00", r"annotations.csv: UTF-16 text; save it as UTF-8"),
    ],
    ids=["never-closed", "closed-rows-later", "into-the-next-quote", "unescaped-quote", "semicolons", "tabs", "utf16"],
)
def test_a_csv_that_would_merge_or_cut_records_is_refused_naming_the_line(
    demo_videos_dir, tmp_path, capsys, data, message
):
    csv_path = _write_bytes(tmp_path / "annotations.csv", data)
    argv = ["--input", str(csv_path), "--video-root", str(demo_videos_dir), "--no-progress"]
    assert prepare_cli.main([*argv, "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_a_multi_line_summary_in_quotes_is_fine(demo_videos_dir, tmp_path):
    csv_path = _write_bytes(
        tmp_path / "annotations.csv",
        b'video,summary\ndemo_000.mp4,"A shape moves.\nThen it stops."\ndemo_001.mp4,Two shapes move.\n',
    )
    report = prepare_dataset(csv_path, tmp_path / "out", video_root=demo_videos_dir, val_ratio=0, progress=False)
    assert [(r.source, r.summary) for r in report.kept] == [
        ("annotations.csv:2", "A shape moves.\nThen it stops."),
        ("annotations.csv:4", "Two shapes move."),
    ]


def test_a_csv_field_over_128_kib_is_read(demo_videos_dir, tmp_path):
    summary = "A shape moves across the frame. " * 5000  # 160,000 characters, over csv's default field limit
    csv_path = _write_csv(tmp_path / "annotations.csv", [("demo_000.mp4", summary), ("demo_001.mp4", "Shapes.")])
    report = prepare_dataset(csv_path, tmp_path / "out", video_root=demo_videos_dir, val_ratio=0, progress=False)
    assert [r.summary for r in report.kept] == [summary.strip(), "Shapes."]
    assert [long.source for long in report.long_summaries] == ["annotations.csv:2"]
    assert csv.field_size_limit() == 128 * 1024  # the process-wide limit is left as it was


def test_text_that_is_not_utf8_or_holds_nul_is_rejected_the_same_way_in_every_format(demo_videos_dir, tmp_path):
    # Folder input: summaries from .txt files.
    folder = tmp_path / "folder"
    folder.mkdir()
    for index, summary in enumerate([b"caf\xe9 scene", b"a NUL\x00 here", "café scene".encode()]):
        shutil.copy(demo_videos_dir / f"demo_00{index}.mp4", folder / f"clip{index}.mp4")
        (folder / f"clip{index}.txt").write_bytes(summary)
    # A file name that is not UTF-8 (a Latin-1 "café.mp4"), with and without its summary.
    latin1_name = os.fsdecode(b"caf\xe9")
    shutil.copy(demo_videos_dir / "demo_003.mp4", folder / f"{latin1_name}.mp4")
    (folder / f"{latin1_name}.txt").write_text("A scene.")
    shutil.copy(demo_videos_dir / "demo_004.mp4", folder / f"{latin1_name}2.mp4")
    report = prepare_dataset(folder, tmp_path / "out_folder", val_ratio=0, progress=False)
    folder_rejects = {(r.reason, r.detail) for r in report.rejected}
    assert folder_rejects == {
        ("not_utf8", "the summary is not UTF-8 text (byte 0xe9 after 'caf'); save clip0.txt as UTF-8"),
        ("nul_character", "the summary holds a NUL character (at character 5); remove it"),
        ("not_utf8", "the video path is not UTF-8 text (byte 0xe9 after 'caf'); give the video a UTF-8 name"),
        ("missing_summary_file", f"no {latin1_name}2.txt beside it"),
    }
    assert [r.summary for r in report.kept] == ["café scene"]
    rejects = _read_jsonl(report.version_dir / "rejected_records.jsonl")  # written as UTF-8, the bytes shown
    assert {r["source"] for r in rejects} == {"clip0.mp4", "clip1.mp4", "caf\\xe9.mp4", "caf\\xe92.mp4"}

    # CSV and JSONL input: the same records, the same reasons; the other records are kept.
    rows = [b"demo_000.mp4,caf\xe9 scene", b"demo_001.mp4,a NUL\x00 here", "demo_002.mp4,café scene".encode()]
    csv_path = _write_bytes(tmp_path / "a.csv", b"video,summary\n" + b"\n".join(rows) + b"\n")
    jsonl_path = _write_bytes(
        tmp_path / "a.jsonl",
        b'{"video": "demo_000.mp4", "summary": "caf\xe9 scene"}\n'
        b'{"video": "demo_001.mp4", "summary": "a NUL\\u0000 here"}\n'
        + json.dumps({"video": "demo_002.mp4", "summary": "café scene"}, ensure_ascii=False).encode()
        + b"\n",
    )
    for path in (csv_path, jsonl_path):
        report = prepare_dataset(path, tmp_path / "out", video_root=demo_videos_dir, val_ratio=0, progress=False)
        assert [(r.reason, r.detail) for r in report.rejected] == [
            ("not_utf8", "the summary is not UTF-8 text (byte 0xe9 after 'caf'); save the file as UTF-8"),
            ("nul_character", "the summary holds a NUL character (at character 5); remove it"),
        ]
        assert [r.summary for r in report.kept] == ["café scene"]
        rejects = (report.version_dir / "rejected_records.jsonl").read_text(encoding="utf-8")
        assert [r["reason"] for r in map(json.loads, rejects.splitlines())] == ["not_utf8", "nul_character"]


def test_frames_counted_by_decord_at_prepare_time_are_recounted_by_the_training_decoder(
    damaged_video, tmp_path, tiny_tokenizer
):
    from internvl.data import build_datasets
    from internvl.data.video import probe_video

    shutil.copy(damaged_video, tmp_path / "a.mp4")
    _write_csv(tmp_path / "annotations.csv", [("a.mp4", "Noise flickers.")])
    prepare_dataset(tmp_path / "annotations.csv", tmp_path / "out", video_backend="decord", progress=False)
    (record,) = _read_jsonl(annotation_path(tmp_path / "out"))
    decord_count, pyav_count = record["decoded_frames"], probe_video(damaged_video).num_frames
    assert record["decoder"] == "decord" and decord_count != pyav_count
    train, _ = build_datasets(tmp_path / "out" / "meta.json", tiny_tokenizer, min_num_frame=2, max_num_frame=4)
    (clips,) = train.datasets
    (parsed,) = clips.records
    assert clips._video_length(parsed, clips.media_path(parsed.video))[0] == pyav_count


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
    assert meta["video_summary_dataset_train"]["root"] == str(_version_dir(output_dir))
    record = _read_jsonl(annotation_path(output_dir))[0]
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
