"""The model-folder checks on the official sharded layout: what they hand on, and check_model_dir alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from internvl.constants import IMG_CONTEXT_TOKEN
from internvl.tools.checks import Status, check_model_dir, model
from tests.tools.checks.test_settings import context_for


def write_sharded_checkpoint(source: Path, target: Path, num_shards: int = 2) -> list[str]:
    """Copy a single-file checkpoint as ``num_shards`` safetensors shards plus ``model.safetensors.index.json``,
    the layout of the official InternVL3-8B release. Returns the shard names."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    shards = [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]
    weight_map = {}
    for i, shard in enumerate(shards):
        part = {name: tensors[name].contiguous() for name in names[i::num_shards]}
        save_file(part, target / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return shards


def test_a_good_folder_hands_on_its_config_and_tokenizer(good_setup):
    results, context = model.check_model(context_for(good_setup))
    assert [r.name for r in results] == ["model config", "weights", "tokenizer"]
    assert all(r.status == Status.OK for r in results), results
    assert context.model_config.model_type == "internvl_chat"
    assert context.tokenizer.convert_tokens_to_ids(IMG_CONTEXT_TOKEN) < context.model_config.llm_config.vocab_size


def test_check_model_dir_alone(good_setup, tmp_path):
    assert [r.status for r in check_model_dir(good_setup / "model")] == [Status.OK] * 3
    [result] = check_model_dir(tmp_path / "nowhere")
    assert result.status == Status.FAIL and "download_internvl3_models.sh" in result.fix


def test_an_hf_layout_folder_passes_as_its_own_layout(tiny_hf_model_dir, tmp_path):
    """transformers' -hf layout (e.g. OpenGVLab/InternVL3-8B-hf), sharded as released."""
    write_sharded_checkpoint(tiny_hf_model_dir, tmp_path / "model")
    results = check_model_dir(tmp_path / "model")
    assert [r.status for r in results] == [Status.OK] * 3, results
    assert results[0].message.startswith("hf layout, Qwen2ForCausalLM")


def test_a_folder_of_neither_layout_is_named_as_such(tiny_model_dir, tmp_path):
    folder = shutil.copytree(tiny_model_dir, tmp_path / "model")
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    [config_result, *_] = check_model_dir(folder)
    assert config_result.status == Status.FAIL
    assert "neither an InternVL checkpoint in the official layout" in config_result.message
    assert "OpenGVLab/InternVL3-8B-hf" in config_result.fix
