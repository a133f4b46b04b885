"""Label masking and image-token expansion follow the official internvl2_5 preprocessing."""

from __future__ import annotations

import pytest
import torch

from internvl.constants import IGNORE_INDEX, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl.conversation import INTERNVL_SYSTEM_MESSAGE, get_conv_template
from internvl.data import Role, Turn, preprocess_conversation
from internvl.data.tokenize import SampleTooLongError, truncate_sample


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _turns(*turns: tuple[str, str]) -> list[Turn]:
    return [Turn(Role(role), value) for role, value in turns]


def _trained_text(tokenizer, sample) -> str:
    labels = sample["labels"]
    return tokenizer.decode(labels[labels != IGNORE_INDEX])


def test_internvl2_5_template_renders_the_official_prompt():
    template = get_conv_template("internvl2_5")
    template.append_message(template.roles[0], "Q1")
    template.append_message(template.roles[1], "A1")
    template.append_message(template.roles[0], "Q2")
    template.append_message(template.roles[1], None)  # the generation prompt
    official_system_message = (
        "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
    )
    assert template.get_prompt() == (
        f"<|im_start|>system\n{official_system_message}<|im_end|>\n"
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\n"
    )
    assert template.stop_token == "<|im_end|>"
    # A fresh copy each time: the messages above do not leak into the next caller.
    assert get_conv_template("internvl2_5").messages == []


def test_tokenizer_without_image_tokens_is_a_clear_error():
    class BareLLMTokenizer:
        unk_token_id = None

        def convert_tokens_to_ids(self, token):
            return None

    with pytest.raises(ValueError, match="has no <img> token.*InternVL chat checkpoint"):
        preprocess_conversation(_turns(("human", "Hi"), ("gpt", "Hello")), BareLLMTokenizer())


def test_labels_train_only_the_answer_and_im_end(tiny_tokenizer):
    conversation = _turns(
        ("human", "Describe the video."),
        ("gpt", "A red circle moves from left to right."),
    )
    sample = preprocess_conversation(conversation, tiny_tokenizer)
    expected_text = (
        f"<|im_start|>system\n{INTERNVL_SYSTEM_MESSAGE}<|im_end|>\n"
        "<|im_start|>user\nDescribe the video.<|im_end|>\n"
        "<|im_start|>assistant\nA red circle moves from left to right.<|im_end|>\n"
    )
    assert sample["input_ids"].tolist() == _ids(tiny_tokenizer, expected_text)

    # Everything up to and including the assistant header is masked; the answer and <|im_end|> are trained;
    # the final "\n" is masked.
    prefix = (
        f"<|im_start|>system\n{INTERNVL_SYSTEM_MESSAGE}<|im_end|>\n"
        "<|im_start|>user\nDescribe the video.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    num_masked_prefix = len(_ids(tiny_tokenizer, "<|im_start|>system\n" + INTERNVL_SYSTEM_MESSAGE + "<|im_end|>\n"))
    num_masked_prefix += len(_ids(tiny_tokenizer, "<|im_start|>user\nDescribe the video.<|im_end|>\n"))
    num_masked_prefix += len(_ids(tiny_tokenizer, "<|im_start|>assistant\n"))
    assert tiny_tokenizer.decode(sample["input_ids"][:num_masked_prefix]) == prefix
    labels = sample["labels"]
    assert (labels[:num_masked_prefix] == IGNORE_INDEX).all()
    answer = _ids(tiny_tokenizer, "A red circle moves from left to right.<|im_end|>")
    assert labels[num_masked_prefix:-1].tolist() == answer
    assert labels[-1] == IGNORE_INDEX and sample["input_ids"][-1] == _ids(tiny_tokenizer, "\n")[0]


def test_multi_turn_and_system_override(tiny_tokenizer):
    conversation = _turns(
        ("system", "You summarize videos."),
        ("human", "What moves?"),
        ("gpt", "A circle."),
        ("human", "Which colour?"),
        ("gpt", "Red."),
    )
    sample = preprocess_conversation(conversation, tiny_tokenizer)
    text = tiny_tokenizer.decode(sample["input_ids"])
    assert text.startswith("<|im_start|>system\nYou summarize videos.<|im_end|>\n")
    assert INTERNVL_SYSTEM_MESSAGE not in text
    assert _trained_text(tiny_tokenizer, sample) == "A circle.<|im_end|>Red.<|im_end|>"


def test_image_placeholders_expand_to_image_token_spans(tiny_tokenizer):
    conversation = _turns(
        ("human", "Frame-1: <image>\nFrame-2: <image>\nSummarize."),
        ("gpt", "Shapes move."),
    )
    sample = preprocess_conversation(conversation, tiny_tokenizer, [256, 256])
    ids = sample["input_ids"]
    context_id, start_id, end_id = tiny_tokenizer.convert_tokens_to_ids(
        [IMG_CONTEXT_TOKEN, IMG_START_TOKEN, IMG_END_TOKEN]
    )
    assert int((ids == context_id).sum()) == 512
    assert int((ids == start_id).sum()) == 2 and int((ids == end_id).sum()) == 2
    assert (sample["labels"][ids == context_id] == IGNORE_INDEX).all()
    # Inserting ids gives exactly what tokenizing the expanded text gives.
    span = IMG_START_TOKEN + IMG_CONTEXT_TOKEN * 256 + IMG_END_TOKEN
    expanded = [Turn(Role.HUMAN, conversation[0].value.replace("<image>", span)), conversation[1]]
    assert ids.tolist() == preprocess_conversation(expanded, tiny_tokenizer, text_only=True)["input_ids"].tolist()


def test_placeholder_count_must_match_images(tiny_tokenizer):
    conversation = _turns(("human", "<image>\n<image>\nCompare."), ("gpt", "Same."))
    with pytest.raises(ValueError, match="more <image> placeholders than images"):
        preprocess_conversation(conversation, tiny_tokenizer, [256])
    with pytest.raises(ValueError, match="2 <image> placeholders in user turns for 3 images"):
        preprocess_conversation(conversation, tiny_tokenizer, [256, 256, 256])


def test_a_system_turn_after_the_first_is_rejected(tiny_tokenizer):
    """The template has one system block: a later system turn cannot be rendered (parse_record refuses it too)."""
    with pytest.raises(ValueError, match="'system' turn may only come first"):
        preprocess_conversation(_turns(("human", "Hi"), ("system", "Be brief."), ("gpt", "Hi")), tiny_tokenizer)


def test_truncation_never_cuts_an_image_span():
    img_end = 9
    #            text  <img> ctx ctx </img> text  answer...
    ids = torch.tensor([1, 2, 3, 3, img_end, 4, 5, 6, 7, 8])
    labels = torch.tensor([IGNORE_INDEX] * 6 + [5, 6, 7, 8])
    cut_ids, cut_labels = truncate_sample(ids, labels, 8, img_end)
    assert cut_ids.tolist() == [1, 2, 3, 3, img_end, 4, 5, 6] and cut_labels.tolist()[-2:] == [5, 6]
    with pytest.raises(SampleTooLongError, match="images alone end at token 5"):
        truncate_sample(ids, labels, 4, img_end)
    with pytest.raises(SampleTooLongError, match="keeps no answer token"):
        truncate_sample(ids, labels, 6, img_end)
    same_ids, _ = truncate_sample(ids, labels, 10, img_end)
    assert same_ids is ids
