"""Merging a LoRA training output gives the official layout (or, asked, the -hf one) and the same outputs as
base + adapter, from a base in either layout."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import InternVLForConditionalGeneration

from internvl.constants import IMG_CONTEXT_TOKEN, IMG_END_TOKEN, IMG_START_TOKEN
from internvl.model import load_internvl_model, load_tokenizer
from internvl.model.adapters import load_model_for_inference, resolve_model_source
from internvl.model.hf_layout import HF_LAYOUT, LAYOUTS, ORIGINAL_LAYOUT, checkpoint_layout
from internvl.tools.merge import MERGE_INFO_NAME, merge_lora

REPO_ROOT = Path(__file__).resolve().parents[2]
# float32 merge: W + s*B@A is computed once instead of x@W + s*(x@A)@B: only float32 rounding differs.
FLOAT32_ATOL = 1e-5
# bfloat16 merge: the merged weights are rounded to bf16 (8 significant bits); logits move by ~0.3% of their
# range on the tiny model (measured), well inside this bound.
BFLOAT16_RELATIVE_TOL = 1e-2


@pytest.fixture(scope="module")
def model_inputs(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    text = f"Frame-1: {IMG_START_TOKEN}{IMG_CONTEXT_TOKEN * 256}{IMG_END_TOKEN}\nDescribe the video in detail."
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    pixel_values = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(2))
    return {"input_ids": input_ids, "pixel_values": pixel_values, "image_flags": torch.ones(1, dtype=torch.long)}


@torch.no_grad()
def _logits(model, inputs):
    model.float().eval()
    return model(**inputs).logits


def _tensors(folder):
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def test_merged_float32_model_matches_base_plus_adapter(tiny_lora_output, tiny_model_dir, model_inputs, tmp_path):
    merged_dir = tmp_path / "merged"
    merge_lora(tiny_lora_output, merged_dir, torch_dtype=torch.float32)

    reference, _, source = load_model_for_inference(tiny_lora_output, torch_dtype=torch.float32, device="cpu")
    assert source.base_model == tiny_model_dir and source.llm_adapter == tiny_lora_output
    base = load_internvl_model(tiny_model_dir, load_in_4bit=False, torch_dtype=torch.float32)
    merged = load_internvl_model(merged_dir, load_in_4bit=False, torch_dtype=torch.float32)

    expected = _logits(reference, model_inputs)
    assert torch.allclose(_logits(merged, model_inputs), expected, rtol=0, atol=FLOAT32_ATOL)
    # The adapter really changes the model, so the equality above is not trivially true.
    assert (_logits(base, model_inputs) - expected).abs().max() > 100 * FLOAT32_ATOL


def test_merge_changes_exactly_the_lora_targets(tiny_lora_output, tiny_model_dir, tmp_path):
    merged_dir = tmp_path / "merged"
    merge_lora(tiny_lora_output, merged_dir, torch_dtype=torch.float32)
    base, merged = _tensors(tiny_model_dir), _tensors(merged_dir)

    assert merged.keys() == base.keys()  # the official key names, no peft prefixes or lora tensors
    changed = {key for key in base if not torch.equal(base[key], merged[key])}
    lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = {key for key in base if key.endswith(".weight") and any(t in key for t in lora_targets)}
    assert changed == expected
    assert all(key.startswith("language_model.model.layers.") for key in changed)


def test_merged_folder_is_an_official_checkpoint(tiny_lora_output, tmp_path):
    merged_dir = tmp_path / "merged"
    info = merge_lora(tiny_lora_output, merged_dir, max_shard_size="200KB")

    config = json.loads((merged_dir / "config.json").read_text())
    assert config["use_llm_lora"] == 0 and config["use_backbone_lora"] == 0
    assert config["architectures"] == ["InternVLChatModel"]
    index = json.loads((merged_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded
    tensors = _tensors(merged_dir)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert "language_model.lm_head.weight" in tensors and "mlp1.1.weight" in tensors
    assert load_tokenizer(merged_dir).convert_tokens_to_ids(IMG_CONTEXT_TOKEN) is not None
    assert info["lora_ranks"] == {"llm": 8}  # the rank of the conftest adapter
    assert "not the 4-bit" in json.loads((merged_dir / MERGE_INFO_NAME).read_text())["merged_onto"]
    # Nothing is left beside the result (the staging folder was renamed into place).
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]


def test_bfloat16_merge_is_close_to_the_float32_reference(tiny_lora_output, model_inputs, tmp_path):
    merge_lora(tiny_lora_output, tmp_path / "merged")
    reference, _, _ = load_model_for_inference(tiny_lora_output, torch_dtype=torch.float32, device="cpu")
    expected = _logits(reference, model_inputs)
    merged = load_internvl_model(tmp_path / "merged", load_in_4bit=False, torch_dtype=torch.bfloat16)
    difference = (_logits(merged, model_inputs) - expected).abs().max()
    assert difference <= BFLOAT16_RELATIVE_TOL * (expected.max() - expected.min())


def test_official_style_lora_checkpoint_merges_too(tiny_lora_model, tiny_model_dir, model_inputs, tmp_path):
    """The official trainer saves the full model with the LoRA layers inside and use_llm_lora set."""
    model = tiny_lora_model
    model.save_pretrained(tmp_path / "official-lora")
    load_tokenizer(tiny_model_dir).save_pretrained(tmp_path / "official-lora")
    expected = _logits(model, model_inputs)

    source = resolve_model_source(tmp_path / "official-lora")
    assert source.lora_in_weights and source.base_model is None
    merge_lora(tmp_path / "official-lora", tmp_path / "merged", torch_dtype=torch.float32)
    merged = load_internvl_model(tmp_path / "merged", load_in_4bit=False, torch_dtype=torch.float32)
    assert merged.config.use_llm_lora == 0
    assert torch.allclose(_logits(merged, model_inputs), expected, rtol=0, atol=FLOAT32_ATOL)


def test_merge_refuses_to_overwrite_a_folder(tiny_lora_output, tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "keep.txt").write_text("data")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge_lora(tiny_lora_output, target)
    assert (target / "keep.txt").read_text() == "data"


def test_a_plain_model_has_nothing_to_merge(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_lora(tiny_model_dir, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_merge_script_writes_the_model_and_says_what_it_merged_onto(
    tiny_lora_output, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(sys, "argv", ["merge_lora.py", str(tiny_lora_output), str(tmp_path / "merged")])
    runpy.run_path(str(REPO_ROOT / "scripts" / "merge_lora.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "original bfloat16 weights, not the 4-bit NF4 weights" in printed
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["use_llm_lora"] == 0


def test_merge_script_reports_bad_input_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["merge_lora.py", str(tmp_path / "missing"), str(tmp_path / "merged")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "scripts" / "merge_lora.py"), run_name="__main__")
    assert exit_info.value.code == f"error: model folder {tmp_path / 'missing'} does not exist"
    assert not (tmp_path / "merged").exists()


def test_remote_code_of_the_base_travels_with_the_merged_model(tiny_lora_output, tiny_model_dir, tmp_path):
    """Official checkpoints load through ``auto_map`` and their own ``*.py`` files: both are kept."""
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_internvl_chat.InternVLChatModel"}
    (base / "config.json").write_text(json.dumps(config))
    (base / "modeling_internvl_chat.py").write_text("# the checkpoint's remote code\n")

    info = merge_lora(tiny_lora_output, tmp_path / "merged", base_model=base)
    assert info["base_model"] == str(base)  # --base-model wins over the adapter's reference
    merged_config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged_config["auto_map"] == config["auto_map"]
    assert (tmp_path / "merged" / "modeling_internvl_chat.py").read_text() == "# the checkpoint's remote code\n"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_an_adapter_trained_on_the_original_layout_merges_onto_the_hf_base(
    tiny_lora_output, tiny_hf_model_dir, model_inputs, tmp_path, layout
):
    reference, _, _ = load_model_for_inference(tiny_lora_output, torch_dtype=torch.float32, device="cpu")
    expected = _logits(reference, model_inputs)
    info = merge_lora(
        tiny_lora_output, tmp_path / "merged", base_model=tiny_hf_model_dir, torch_dtype=torch.float32, layout=layout
    )
    assert info["layout"] == layout and checkpoint_layout(tmp_path / "merged") == layout
    merged = load_internvl_model(tmp_path / "merged", load_in_4bit=False, torch_dtype=torch.float32)
    assert torch.allclose(_logits(merged, model_inputs), expected, rtol=0, atol=FLOAT32_ATOL)


def test_an_adapter_trained_on_the_hf_layout_merges_onto_the_original_base(
    tiny_hf_lora_output, tiny_lora_output, tiny_hf_model_dir, tiny_model_dir, model_inputs, tmp_path
):
    # The adapter is keyed relative to the LLM, whose names both layouts share.
    assert _tensors(tiny_hf_lora_output).keys() == _tensors(tiny_lora_output).keys()
    reference, _, source = load_model_for_inference(tiny_hf_lora_output, torch_dtype=torch.float32, device="cpu")
    assert source.base_model == tiny_hf_model_dir
    expected = _logits(reference, model_inputs)

    merge_lora(tiny_hf_lora_output, tmp_path / "merged", base_model=tiny_model_dir, torch_dtype=torch.float32)
    assert checkpoint_layout(tmp_path / "merged") == ORIGINAL_LAYOUT
    assert _tensors(tmp_path / "merged").keys() == _tensors(tiny_model_dir).keys()
    merged = load_internvl_model(tmp_path / "merged", load_in_4bit=False, torch_dtype=torch.float32)
    assert torch.allclose(_logits(merged, model_inputs), expected, rtol=0, atol=FLOAT32_ATOL)
    base = load_internvl_model(tiny_hf_model_dir, load_in_4bit=False, torch_dtype=torch.float32)
    assert (_logits(base, model_inputs) - expected).abs().max() > 100 * FLOAT32_ATOL  # the adapter matters


def test_an_hf_merge_runs_in_transformers_own_class(tiny_lora_output, model_inputs, tmp_path):
    merge_lora(tiny_lora_output, tmp_path / "merged", torch_dtype=torch.float32, layout=HF_LAYOUT)
    reference, _, _ = load_model_for_inference(tiny_lora_output, torch_dtype=torch.float32, device="cpu")
    hf = InternVLForConditionalGeneration.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(input_ids=model_inputs["input_ids"], pixel_values=model_inputs["pixel_values"]).logits
    torch.testing.assert_close(logits, _logits(reference, model_inputs), rtol=0, atol=1e-4)
    # Remote code belongs to the official layout only.
    assert not list((tmp_path / "merged").glob("*.py"))


def test_a_model_the_hf_layout_cannot_hold_is_refused_and_nothing_is_written(tiny_lora_output, tmp_path):
    output = shutil.copytree(tiny_lora_output, tmp_path / "output")
    config = json.loads((output / "config.json").read_text())
    config["ps_version"] = "v1"  # transformers implements only the v2 pixel shuffle
    (output / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="ps_version"):
        merge_lora(output, tmp_path / "merged", layout=HF_LAYOUT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output"]


def test_merge_script_writes_the_hf_layout_with_format_hf(tiny_lora_output, tmp_path, monkeypatch, capsys):
    argv = ["merge_lora.py", str(tiny_lora_output), str(tmp_path / "merged"), "--format", "hf"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(REPO_ROOT / "scripts" / "merge_lora.py"), run_name="__main__")
    assert "the result is in transformers' -hf layout" in capsys.readouterr().out
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "internvl"


def test_merged_weights_get_the_permissions_of_every_other_file(tiny_lora_output, tmp_path):
    previous = os.umask(0o022)
    try:
        merge_lora(tiny_lora_output, tmp_path / "merged", torch_dtype=torch.float32)
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "merged").iterdir()}
    weights = [name for name in modes if name.endswith(".safetensors")]
    assert weights and all(modes[name] == modes["config.json"] == 0o644 for name in weights), modes


def test_merge_names_a_damaged_adapter(tiny_lora_output, tmp_path, monkeypatch):
    damaged = tmp_path / "output"
    shutil.copytree(tiny_lora_output, damaged)
    adapter = damaged / "adapter_model.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    monkeypatch.setattr(sys, "argv", ["merge_lora.py", str(damaged), str(tmp_path / "merged")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO_ROOT / "scripts" / "merge_lora.py"), run_name="__main__")
    assert str(exit_info.value.code).startswith(f"error: {adapter} is damaged")
    assert not (tmp_path / "merged").exists()
