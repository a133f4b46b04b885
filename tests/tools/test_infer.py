"""Inference inputs (frames, tiles, prompts) and generation on the tiny model with demo videos."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from PIL import Image

from internvl.constants import IMG_CONTEXT_TOKEN
from internvl.data.prepare import DEFAULT_PROMPT
from internvl.data.tiling import build_transform
from internvl.data.video import read_video_frames
from internvl.model.adapters import load_model_for_inference
from internvl.tools.infer import (
    generate_answers,
    generation_config,
    load_image,
    load_video,
    load_visual_input,
    summarize,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def lora_model(tiny_lora_output):
    model, tokenizer, _ = load_model_for_inference(tiny_lora_output, torch_dtype=torch.float32, device="cpu")
    return model, tokenizer


def test_video_frames_are_taken_at_segment_middles(demo_videos_dir):
    video = demo_videos_dir / "demo_000.mp4"  # 24 frames: 4 segments of 6, middles 2, 8, 14, 20
    visual = load_video(video, num_frames=4, image_size=448)
    assert visual.is_video and visual.pixel_values.shape == (4, 3, 448, 448)
    transform = build_transform(is_train=False, input_size=448)
    all_frames = read_video_frames(video, 24, "middle")
    expected = torch.stack([transform(all_frames[i]) for i in (2, 8, 14, 20)])
    assert torch.allclose(visual.pixel_values, expected)


def test_a_short_video_gives_each_frame_once(demo_videos_dir):
    visual = load_video(demo_videos_dir / "demo_001.mp4", num_frames=100, image_size=448)
    assert visual.num_tiles == 24  # the demo clips have 24 frames; none is repeated to reach 100


def test_a_frame_count_made_by_another_decoder_is_recounted(demo_videos_dir):
    # prepare counted 30 frames with decord (a damaged file can decode differently); PyAV decodes 24 of this one.
    video = demo_videos_dir / "demo_000.mp4"
    visual = load_video(video, num_frames=4, image_size=448, decoded_frames=30, decoder="decord")
    assert torch.allclose(visual.pixel_values, load_video(video, num_frames=4, image_size=448).pixel_values)


def test_an_image_gets_dynamic_tiles_and_a_thumbnail(tmp_path, tiny_model_dir):
    from internvl.model import InternVLChatConfig

    path = tmp_path / "wide.png"
    Image.new("RGB", (896, 448), (200, 30, 30)).save(path)
    config = InternVLChatConfig.from_pretrained(tiny_model_dir)  # max_dynamic_patch 12, use_thumbnail
    visual = load_visual_input(path, config)
    # Aspect 2:1 -> a 2x1 grid of 448-px tiles, plus the thumbnail.
    assert not visual.is_video and visual.num_tiles == 3
    assert load_image(path, 448, max_num_tiles=1).num_tiles == 1
    assert visual.question("What is shown?") == "<image>\nWhat is shown?"


def test_missing_media_is_a_clear_error(tmp_path, tiny_model_dir):
    from internvl.model import InternVLChatConfig

    with pytest.raises(FileNotFoundError, match="gone.mp4"):
        load_visual_input(tmp_path / "gone.mp4", InternVLChatConfig.from_pretrained(tiny_model_dir))


def test_video_prompt_becomes_one_frame_line_per_tile(lora_model, demo_videos_dir, monkeypatch):
    model, tokenizer = lora_model
    seen = {}
    original_generate = model.generate

    def spy_generate(**kwargs):
        seen["input_ids"] = kwargs["input_ids"]
        seen["output_ids"] = original_generate(**kwargs)
        return seen["output_ids"]

    monkeypatch.setattr(model, "generate", spy_generate)
    answer = summarize(model, tokenizer, demo_videos_dir / "demo_002.mp4", num_frames=3,
                       generation_kwargs=generation_config(MAX_NEW_TOKENS))  # fmt: skip
    assert isinstance(answer, str)
    assert seen["output_ids"].shape[1] <= MAX_NEW_TOKENS
    prompt = tokenizer.decode(seen["input_ids"][0])
    assert (seen["input_ids"][0] == tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN)).sum() == 3 * 256
    assert "Frame-1: <img>" in prompt and "Frame-3: <img>" in prompt and "Frame-4" not in prompt
    assert "<video>" not in prompt
    assert prompt.rstrip().endswith(f"{DEFAULT_PROMPT}<|im_end|>\n<|im_start|>assistant")


def test_batched_answers_equal_one_at_a_time(lora_model, demo_videos_dir):
    model, tokenizer = lora_model
    visuals = [load_video(demo_videos_dir / f"demo_00{i}.mp4", n, 448) for i, n in ((0, 4), (1, 2), (2, 3))]
    prompts = ["Summarize.", "Describe the video in detail. What happens at the end?", "Hi"]
    kwargs = generation_config(MAX_NEW_TOKENS)
    batched = generate_answers(model, tokenizer, visuals, prompts, kwargs)
    single = [generate_answers(model, tokenizer, [v], [p], kwargs)[0] for v, p in zip(visuals, prompts)]
    assert batched == single
    assert all(answer for answer in batched)


def test_system_message_is_used_and_restored(lora_model, demo_videos_dir, monkeypatch):
    model, tokenizer = lora_model
    queries = []
    original = model._build_query

    def spy(tokenizer, question, history, num_patches_list):
        query, stop = original(tokenizer, question, history, num_patches_list)
        queries.append(query)
        return query, stop

    monkeypatch.setattr(model, "_build_query", spy)
    visual = load_video(demo_videos_dir / "demo_000.mp4", 1, 448)
    before = model.system_message
    generate_answers(model, tokenizer, [visual], ["Hi"], generation_config(2), system_message="Be brief.")
    assert queries[0].startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert model.system_message == before


def test_adapter_model_loads_in_4bit(tiny_lora_output, demo_videos_dir):
    model, tokenizer, source = load_model_for_inference(tiny_lora_output, load_in_4bit=True, device="cpu")
    quantized = [m for m in model.language_model.modules() if isinstance(m, Linear4bit)]
    assert quantized and source.llm_adapter == tiny_lora_output
    assert any("lora_A" in name for name, _ in model.language_model.named_parameters())
    answer = summarize(model, tokenizer, demo_videos_dir / "demo_000.mp4", num_frames=2,
                       generation_kwargs=generation_config(MAX_NEW_TOKENS))  # fmt: skip
    assert isinstance(answer, str) and answer


def test_infer_script_prints_the_summary(lora_model, tiny_lora_output, demo_videos_dir, monkeypatch, capsys):
    model, tokenizer = lora_model
    video = demo_videos_dir / "demo_003.mp4"
    expected = summarize(model, tokenizer, video, num_frames=2, generation_kwargs=generation_config(MAX_NEW_TOKENS))
    monkeypatch.setattr(sys, "argv", [
        "infer_internvl3.py", "--model", str(tiny_lora_output), "--video", str(video), "--num-frames", "2",
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--dtype", "float32", "--device", "cpu",
    ])  # fmt: skip
    runpy.run_path(str(REPO_ROOT / "scripts" / "infer_internvl3.py"), run_name="__main__")
    output = capsys.readouterr()
    assert output.out.strip() == expected
    assert "LoRA adapter" in output.err


@pytest.mark.parametrize("flag, name, message", [
    ("--image", "demo_000.mp4", "--image {path} is not an image file"),
    ("--video", "photo.png", "--video {path} is an image file; use --image"),
])  # fmt: skip
def test_the_media_flag_is_honoured(demo_videos_dir, tmp_path, monkeypatch, flag, name, message):
    path = demo_videos_dir / name if name.endswith(".mp4") else tmp_path / name
    if name.endswith(".png"):
        Image.new("RGB", (32, 32)).save(path)
    monkeypatch.setattr(sys, "argv", ["infer_internvl3.py", "--model", str(tmp_path / "no-model"), flag, str(path)])
    with pytest.raises(SystemExit) as exit_info:  # before the model is looked at
        runpy.run_path(str(REPO_ROOT / "scripts" / "infer_internvl3.py"), run_name="__main__")
    assert str(exit_info.value.code).startswith("error: " + message.format(path=path))
