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
def tiny_tokenizer(tiny_model_dir):
    from internvl.model.loading import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def demo_videos_dir(tmp_path_factory):
    """A folder of small synthetic MP4 videos with an ``annotations.csv`` of summaries."""
    from internvl.data.demo import make_demo_videos

    return make_demo_videos(tmp_path_factory.mktemp("demo-videos"), num_videos=6, seed=0)
