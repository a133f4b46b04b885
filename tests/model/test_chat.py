"""Inference entry points on the tiny model: generate, chat (image and video) and batch_chat."""

from __future__ import annotations

import pytest
import torch

from internvl.constants import IMG_CONTEXT_TOKEN
from internvl.conversation import get_conv_template, video_frame_prompt
from internvl.model import load_internvl_model

GREEDY = {"max_new_tokens": 6, "do_sample": False}


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_internvl_model(tiny_model_dir, load_in_4bit=False, torch_dtype=torch.float32).eval()


def test_chat_on_an_image_returns_text(model, tiny_tokenizer):
    response = model.chat(tiny_tokenizer, torch.randn(2, 3, 448, 448), "Describe the image.", GREEDY)
    assert isinstance(response, str)
    assert IMG_CONTEXT_TOKEN not in response and "<|im_end|>" not in response


def test_chat_prompt_expands_a_video_to_frame_lines(model, tiny_tokenizer, capsys):
    frames = torch.randn(3, 3, 448, 448)
    response, history = model.chat(
        tiny_tokenizer,
        frames,
        "<video>\nSummarize the video.",
        GREEDY,
        num_patches_list=[1, 1, 1],
        return_history=True,
        verbose=True,
    )
    printed = capsys.readouterr().out
    assert "Frame-1: <img><IMG_CONTEXT*n></img>\nFrame-2:" in printed and "Frame-3:" in printed
    assert isinstance(response, str)
    assert history == [(video_frame_prompt(3) + "Summarize the video.", response)]
    # A follow-up turn keeps the frames of the first question in the prompt.
    follow_up = model.chat(tiny_tokenizer, frames, "And then?", GREEDY, history=history, num_patches_list=[1, 1, 1])
    assert isinstance(follow_up, str)


def test_chat_uses_the_checkpoint_template(model, tiny_tokenizer, capsys):
    model.chat(tiny_tokenizer, None, "Hello", GREEDY, verbose=True)
    printed = capsys.readouterr().out
    expected = (
        get_conv_template("internvl2_5").system_prompt + "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
    assert printed == expected + "\n"


def test_chat_rejects_mismatched_patch_counts(model, tiny_tokenizer):
    with pytest.raises(ValueError, match="num_patches_list sums to 2 but pixel_values has 3 tiles"):
        model.chat(tiny_tokenizer, torch.randn(3, 3, 448, 448), "<video>", GREEDY, num_patches_list=[1, 1])


def test_generate_is_greedy_deterministic_and_returns_new_tokens(model, tiny_tokenizer):
    prompt = "<|im_start|>user\n<img>" + IMG_CONTEXT_TOKEN * model.num_image_token + "</img>\nHi<|im_end|>\n"
    inputs = tiny_tokenizer(prompt, return_tensors="pt")
    pixel_values = torch.randn(1, 3, 448, 448)
    first = model.generate(pixel_values=pixel_values, **inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    second = model.generate(pixel_values=pixel_values, **inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert first.shape == (1, 5)
    assert torch.equal(first, second)


def test_batch_chat_answers_each_question_like_chat(model, tiny_tokenizer):
    pixel_values = torch.randn(3, 3, 448, 448)
    questions = ["What is shown?", "Describe the scene."]
    answers = model.batch_chat(tiny_tokenizer, pixel_values, questions, GREEDY, num_patches_list=[1, 2])
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    # Left padding must not change the answer of the longer prompt.
    single = model.chat(tiny_tokenizer, pixel_values[1:], questions[1], GREEDY)
    assert answers[1] == single
