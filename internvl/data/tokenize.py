"""Conversation -> ``input_ids`` / ``labels`` with the official InternVL masking.

The conversation is rendered with a chat template (``internvl2_5`` for InternVL2.5/3): a system block, then one
segment per turn. Each segment is tokenized on its own, as in the official code. Only assistant answers are
trained: the system and user segments and the assistant header (``<|im_start|>assistant\\n``) get ``IGNORE_INDEX``,
the answer and its ``<|im_end|>`` are trained, the trailing ``\\n`` is not.

Each ``<image>`` in a user turn becomes ``<img>`` + ``<IMG_CONTEXT>`` x n + ``</img>``. The image tokens are inserted
as ids rather than as text: the tokenizer splits text at special tokens before anything else, so the result is the
same as tokenizing the expanded string, without building strings of thousands of tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from internvl.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl.conversation import get_conv_template
from internvl.data.records import Role, Turn


class SampleTooLongError(ValueError):
    """A sample that cannot be cut to ``max_seq_length`` without losing an image span or every answer token."""


def image_token_ids(tokenizer) -> tuple[int, int, int]:
    """The ids of ``<img>``, ``<IMG_CONTEXT>`` and ``</img>``; a clear error if the tokenizer lacks them."""
    ids = []
    for token in (IMG_START_TOKEN, IMG_CONTEXT_TOKEN, IMG_END_TOKEN):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(
                f"the tokenizer has no {token} token; use the tokenizer of an InternVL chat checkpoint "
                "(internvl.model.load_tokenizer checks it has the InternVL special tokens), not a bare LLM's"
            )
        ids.append(token_id)
    return ids[0], ids[1], ids[2]


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def preprocess_conversation(
    turns: Sequence[Turn],
    tokenizer,
    num_image_token_list: Sequence[int] = (),
    *,
    template_name: str = "internvl2_5",
    text_only: bool = False,
) -> dict[str, torch.Tensor]:
    """Tokenize one conversation: the turns of a ``Record`` (``internvl.data.parse_record`` checked them: a system
    turn only first, a user turn, a non-empty answer), with the placeholders the dataset put in.

    ``num_image_token_list[k]`` is the number of ``<IMG_CONTEXT>`` tokens for the k-th ``<image>`` over all user
    turns (256 per tile for InternVL3); the placeholder count must match it. With ``text_only`` placeholders stay
    text. Returns ``input_ids`` and ``labels``, LongTensors ``[L]``.
    """
    template = get_conv_template(template_name)
    turns = list(turns)
    if turns and turns[0].role is Role.SYSTEM:
        template.set_system_message(turns.pop(0).value)
    user_role, assistant_role = template.roles
    img_start, img_context, img_end = image_token_ids(tokenizer)

    input_ids = _encode(tokenizer, template.system_prompt)
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        input_ids = [tokenizer.bos_token_id] + input_ids
    labels = [IGNORE_INDEX] * len(input_ids)
    header_length = len(_encode(tokenizer, assistant_role))
    # The separator's trailing newline (if any) is its own token: it closes the turn but is not trained.
    untrained_tail = 1 if template.sep.endswith("\n") else 0

    images_used = 0
    for turn in turns:
        role, value = turn.role, turn.value
        if role is Role.HUMAN:
            pieces = [value] if text_only else value.split(IMAGE_PLACEHOLDER)
            segment = _encode(tokenizer, user_role + pieces[0])
            for piece in pieces[1:]:
                if images_used >= len(num_image_token_list):
                    raise ValueError(
                        f"the conversation has more {IMAGE_PLACEHOLDER} placeholders than images "
                        f"({len(num_image_token_list)})"
                    )
                segment += [img_start] + [img_context] * num_image_token_list[images_used] + [img_end]
                images_used += 1
                segment += _encode(tokenizer, piece)
            segment += _encode(tokenizer, template.sep)
            input_ids += segment
            labels += [IGNORE_INDEX] * len(segment)
        elif role is Role.GPT:
            segment = _encode(tokenizer, assistant_role + value + template.sep)
            trained_end = len(segment) - untrained_tail
            input_ids += segment
            labels += (
                [IGNORE_INDEX] * header_length + segment[header_length:trained_end] + [IGNORE_INDEX] * untrained_tail
            )
        else:
            raise ValueError("a 'system' turn may only come first")
    if not text_only and images_used != len(num_image_token_list):
        raise ValueError(
            f"the conversation has {images_used} {IMAGE_PLACEHOLDER} placeholders in user turns for "
            f"{len(num_image_token_list)} images"
        )
    return {"input_ids": torch.tensor(input_ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


def truncate_sample(
    input_ids: torch.Tensor, labels: torch.Tensor, max_length: int, img_end_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a sample to ``max_length`` tokens, only after its last image span.

    Raises ``SampleTooLongError`` if the cut would fall inside an image span (the model would see a broken image)
    or would remove every trained token.
    """
    if len(input_ids) <= max_length:
        return input_ids, labels
    image_ends = (input_ids == img_end_id).nonzero()
    last_image_end = int(image_ends[-1]) + 1 if len(image_ends) else 0
    if last_image_end > max_length:
        raise SampleTooLongError(
            f"{len(input_ids)} tokens, and its images alone end at token {last_image_end} > max_seq_length "
            f"{max_length}; lower max_dynamic_patch or raise max_seq_length"
        )
    if bool((labels[:max_length] == IGNORE_INDEX).all()):
        raise SampleTooLongError(
            f"{len(input_ids)} tokens; cut to max_seq_length {max_length} it keeps no answer token"
        )
    return input_ids[:max_length], labels[:max_length]
