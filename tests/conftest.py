"""Shared fixtures: the tiny model and the demo videos are built once per test session."""

from __future__ import annotations

import os

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-init InternVL3-layout checkpoint with its offline-trained tokenizer."""
    from internvl.model.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("tiny-internvl3"), seed=0)


@pytest.fixture(scope="session")
def tiny_hf_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model converted to transformers' -hf layout (``InternVLForConditionalGeneration``), as
    ``merge_lora.py --format hf`` writes it: the same weights under transformers' names, its tokenizer and processor."""
    import torch

    from internvl.model.hf_layout import save_in_hf_layout
    from internvl.model.loading import load_internvl_model, load_tokenizer

    model = load_internvl_model(tiny_model_dir, load_in_4bit=False, torch_dtype=torch.float32)
    output_dir = tmp_path_factory.mktemp("tiny-internvl3-hf")
    save_in_hf_layout(model, load_tokenizer(tiny_model_dir), output_dir)
    return output_dir


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from internvl.model.loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def demo_videos_dir(tmp_path_factory):
    """A folder of small synthetic MP4 videos with an ``annotations.csv`` of summaries."""
    from internvl.data.demo import make_demo_videos

    return make_demo_videos(tmp_path_factory.mktemp("demo-videos"), num_videos=6, seed=0)


@pytest.fixture(scope="session")
def good_setup(tmp_path_factory, tiny_model_dir, demo_videos_dir):
    """What the setup check passes: the tiny model in the official sharded layout (``model/``), demo videos
    (``raw/``) and data prepared from them (``data/``, portable: its paths start from its folder), side by side in
    one folder."""
    import shutil
    from pathlib import Path

    from internvl.data.prepare import prepare_dataset
    from tests.tools.checks.test_model import write_sharded_checkpoint

    base = tmp_path_factory.mktemp("setup")
    write_sharded_checkpoint(Path(tiny_model_dir), base / "model")
    shutil.copytree(demo_videos_dir, base / "raw")
    prepare_dataset(base / "raw", base / "data", portable=True, progress=False)
    return base


@pytest.fixture
def setup_copy(good_setup, tmp_path):
    """A copy of ``good_setup`` to plant a fault in (relative paths inside stay valid)."""
    import shutil

    return shutil.copytree(good_setup, tmp_path / "setup")


@pytest.fixture(scope="session")
def damaged_video(tmp_path_factory):
    """An MP4 of 96 noise frames whose 41st packet is damaged (its length field overwritten): PyAV skips that packet
    and decodes the rest, decord stops there, so the two count different numbers of frames."""
    import av

    from tests.media import write_noise_video

    path = write_noise_video(tmp_path_factory.mktemp("damaged") / "damaged.mp4", 96)
    with av.open(str(path)) as container:
        position = [packet.pos for packet in container.demux(video=0) if packet.size][40]
    data = bytearray(path.read_bytes())
    data[position : position + 4] = b"\xff" * 4
    path.write_bytes(bytes(data))
    return path


TINY_LORA_RANK = 8


def make_tiny_video_samples(tokenizer, num_image_token: int, seed: int = 0) -> list[dict]:
    """Dataset-style samples of 1-2 video frames (one random tile each) and summaries of very different lengths
    (1 to 40 words), for checks of batching and loss normalization."""
    import torch

    from internvl.conversation import video_frame_prompt
    from internvl.data import Role, Turn, preprocess_conversation

    words = "a red circle moves to the right while a blue square grows and then turns green".split()
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for frames, answer_words in [(1, 3), (1, 40), (2, 12), (1, 1)]:
        question = video_frame_prompt(frames) + "Summarize the video."
        answer = " ".join(words[i % len(words)] for i in range(answer_words))
        turns = [Turn(Role.HUMAN, question), Turn(Role.GPT, answer)]
        tokens = preprocess_conversation(turns, tokenizer, [num_image_token] * frames)
        samples.append({
            **tokens,
            "pixel_values": torch.randn(frames, 3, 448, 448, generator=generator),
            "image_flags": torch.ones(frames, dtype=torch.long),
        })  # fmt: skip
    return samples


@pytest.fixture(scope="session")
def tiny_video_samples(tiny_model_dir, tiny_tokenizer):
    """``make_tiny_video_samples`` for the tiny model (treat them as read-only)."""
    from internvl.model.configuration import InternVLChatConfig

    return make_tiny_video_samples(tiny_tokenizer, InternVLChatConfig.from_pretrained(tiny_model_dir).num_image_token)


def _tiny_lora_model(model_dir):
    """The tiny model as LoRA training leaves it: vision tower and projector frozen, the LLM wrapped with LoRA whose
    B matrices are random (peft initialises them to zero, and a zero adapter would change nothing)."""
    import torch

    from internvl.model.loading import load_internvl_model

    model = load_internvl_model(model_dir, load_in_4bit=False, torch_dtype=torch.float32)
    for param in [*model.vision_model.parameters(), *model.mlp1.parameters()]:
        param.requires_grad_(False)
    model.wrap_llm_lora(r=TINY_LORA_RANK)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


@pytest.fixture
def tiny_lora_model(tiny_model_dir):
    """A fresh LoRA-wrapped tiny model with a non-zero adapter (see ``_tiny_lora_model``)."""
    return _tiny_lora_model(tiny_model_dir)


def _tiny_lora_output(model_dir, output_dir):
    """A training output folder written by the trainer's own saving code: the LLM LoRA adapter (peft format,
    naming ``model_dir`` as its base), config.json and the tokenizer."""
    from internvl.model.loading import load_tokenizer
    from internvl.train.checkpoint import gather_trainable_state_dict, save_trained_weights

    model = _tiny_lora_model(model_dir)
    save_trained_weights(model, gather_trainable_state_dict(model), output_dir, base_model_path=str(model_dir))
    load_tokenizer(model_dir).save_pretrained(output_dir)
    return output_dir


@pytest.fixture(scope="session")
def tiny_lora_output(tiny_model_dir, tmp_path_factory):
    """A training output of the tiny model (see ``_tiny_lora_output``)."""
    return _tiny_lora_output(tiny_model_dir, tmp_path_factory.mktemp("tiny-lora-output"))


@pytest.fixture(scope="session")
def tiny_hf_lora_output(tiny_hf_model_dir, tmp_path_factory):
    """A training output of the tiny model in the -hf layout: its adapter names the -hf folder as its base."""
    return _tiny_lora_output(tiny_hf_model_dir, tmp_path_factory.mktemp("tiny-hf-lora-output"))
