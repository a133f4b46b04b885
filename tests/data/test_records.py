"""parse_record / read_records: every official record type normalised one way, every refusal a RecordError naming
the file and line."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from internvl.data.records import Record, RecordError, Role, Turn, parse_record, read_records

QUESTION = {"from": "human", "value": "<video>\nSummarize."}
ANSWER = {"from": "gpt", "value": "A red circle moves."}


def _record(**fields) -> dict:
    return {"conversations": [QUESTION, ANSWER], **fields}


def test_a_video_record_with_what_prepare_writes():
    raw = _record(id="clip_a", video="clips/a.mp4", decoded_frames=96, decoder="pyav", fps=24, clip=[2, 6.5],
                  length=4500, duration=4.0, width=640)  # fmt: skip
    record = parse_record(raw, "data/train.jsonl", 7)
    assert record == Record(
        path=Path("data/train.jsonl"),
        line=7,
        conversations=(Turn(Role.HUMAN, "<video>\nSummarize."), Turn(Role.GPT, "A red circle moves.")),
        video="clips/a.mp4",
        id="clip_a",
        length=4500,
        decoded_frames=96,
        decoder="pyav",
        fps=24.0,
        clip=(2.0, 6.5),
    )
    assert record.source == "train.jsonl:7" and record.media == ("clips/a.mp4",)
    assert record.answers == ["A red circle moves."]


def test_image_field_forms_and_text_records():
    assert parse_record(_record(image="a.png"), "t.jsonl", 1).images == ("a.png",)
    assert parse_record(_record(image=["a.png", "b.png"]), "t.jsonl", 1).media == ("a.png", "b.png")
    for empty in ("", [], None):  # absent, as in the official code: a text record
        record = parse_record(_record(image=empty, video=empty), "t.jsonl", 1)
        assert record.media == () and record.images == () and record.video is None
    system = {"from": "system", "value": "Be brief."}
    record = parse_record({"id": 3, "conversations": [system, QUESTION, ANSWER]}, "t.jsonl", 1)
    assert [turn.role for turn in record.conversations] == [Role.SYSTEM, Role.HUMAN, Role.GPT]
    assert record.id == "3"


@pytest.mark.parametrize(
    "raw, reason",
    [
        (["not", "an", "object"], "a record must be an object with a 'conversations' list"),
        ({"video": "a.mp4"}, "a record must be an object with a 'conversations' list"),
        ({"conversations": "Summarize."}, "'conversations' must be a list of turns"),
        ({"conversations": [QUESTION, "A cat."]}, "each turn needs 'from' in 'system', 'human', 'gpt'"),
        ({"conversations": [{"from": "bot", "value": "Hi"}, ANSWER]}, "each turn needs 'from'"),
        ({"conversations": [QUESTION, {"from": "gpt", "value": 3}]}, "a string 'value'"),
        ({"conversations": [QUESTION, {"from": "system", "value": "Be brief."}, ANSWER]},
         "a 'system' turn may only come first"),
        ({"conversations": [ANSWER]}, "no 'human' turn"),
        ({"conversations": [QUESTION]}, "no non-empty 'gpt' turn"),
        ({"conversations": [QUESTION, {"from": "gpt", "value": "  "}]}, "no non-empty 'gpt' turn"),
        (_record(image=3), "'image' must be a path or a list of paths"),
        (_record(image=["a.png", None]), "'image' must be a path or a list of paths"),
        (_record(video=["a.mp4"]), "'video' must be a path string"),
        (_record(video="a.mp4", image="a.png"), "either 'image' or 'video', not both"),
        (_record(id=["a"]), "'id' must be a string or an integer"),
        (_record(length="long"), "'length' must be a token count"),
        (_record(length=-1), "'length' must be a token count"),
        (_record(decoded_frames=0), "'decoded_frames' must be a positive integer"),
        (_record(decoded_frames=True), "'decoded_frames' must be a positive integer"),
        (_record(decoder=1), "'decoder' must be the name of a video decoder"),
        (_record(fps=0), "'fps' must be a positive number"),
        (_record(clip=[5, 2]), "'clip' must be \\[start_s, end_s\\]"),
        (_record(clip=[1]), "'clip' must be \\[start_s, end_s\\]"),
    ],
)  # fmt: skip
def test_each_refusal_names_the_file_line_and_reason(raw, reason):
    with pytest.raises(RecordError, match=reason) as refused:
        parse_record(raw, Path("data") / "train.jsonl", 12)
    assert str(refused.value).startswith(f"{Path('data') / 'train.jsonl'}:12: ")
    assert refused.value.source == "train.jsonl:12" and refused.value.line == 12


def test_read_records_keeps_refused_records_in_place(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [_record(id="a"), {"conversations": [QUESTION]}, _record(id="c")]
    path.write_text(json.dumps(lines[0]) + "\n\n" + "\n".join(json.dumps(raw) for raw in lines[1:]) + "\n")
    first, refused, last = read_records(path)
    assert (first.id, first.line, last.id, last.line) == ("a", 1, "c", 4)  # the blank line 2 is skipped
    assert isinstance(refused, RecordError) and str(refused).startswith(f"{path}:3: no non-empty 'gpt' turn")
    # It travels to DataLoader worker processes with the dataset.
    assert str(pickle.loads(pickle.dumps(refused))) == str(refused)


def test_a_line_that_is_not_json_refuses_the_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(_record()) + "\n" + json.dumps(_record())[:20] + "\n")
    with pytest.raises(RecordError, match=f"{path}:2: not valid JSON"):
        read_records(path)
