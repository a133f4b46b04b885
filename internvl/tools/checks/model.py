"""The model folder: config.json, every weight shard and the tokenizer of an InternVL checkpoint, in the official
layout or transformers' -hf one (``internvl.model.hf_layout``).

``check_model_dir`` runs these checks alone, for ``python -m internvl.tools.download`` after a download.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from internvl.constants import CHATML_SPECIAL_TOKENS, IMG_CONTEXT_TOKEN, INTERNVL_SPECIAL_TOKENS
from internvl.tools.checks.context import CheckContext, Checked
from internvl.tools.checks.results import CheckResult, fail, listing, ok, read_json, size, warn

DOWNLOAD_COMMAND = "bash scripts/download_internvl3_models.sh"
# Tensors every InternVL3 checkpoint has (under the official names; -hf folders hold them under transformers'
# names); their absence means a wrong or partial folder.
ESSENTIAL_TENSORS = (
    "vision_model.embeddings.patch_embedding.weight",
    "mlp1.1.weight",
    "language_model.model.embed_tokens.weight",
    "language_model.lm_head.weight",
)


def check_model(context: CheckContext) -> Checked:
    """The model folder of ``MODEL_PATH``, with the training arguments that depend on it. Finds ``model_config`` and
    ``tokenizer``."""
    results, config, tokenizer = _check_folder(context.settings.model_path, context.settings.data_args)
    return results, replace(context, model_config=config, tokenizer=tokenizer)


def check_model_dir(path: str | os.PathLike) -> list[CheckResult]:
    """The model-folder checks alone (config, weight shards, tokenizer), e.g. after a download."""
    return _check_folder(Path(path), data_args=None)[0]


def _check_folder(path: Path, data_args) -> tuple[list[CheckResult], Any, Any]:
    """Config, every weight shard and the tokenizer of an InternVL checkpoint folder: the results, and the config
    and tokenizer when they load (``None`` otherwise)."""
    if not path.is_dir():
        return [fail("model folder", f"{path} does not exist", f"{DOWNLOAD_COMMAND} (or set MODEL_PATH)")], None, None
    config_results, config = _check_config(path, data_args)
    tokenizer_results, tokenizer = _check_tokenizer(path, config)
    return config_results + _check_weights(path, config) + tokenizer_results, config, tokenizer


def _check_config(path: Path, data_args) -> tuple[list[CheckResult], Any]:
    name = "model config"
    config_file = path / "config.json"
    if not config_file.is_file():
        return [fail(name, f"{config_file} is missing", f"re-run {DOWNLOAD_COMMAND}")], None
    raw, error = read_json(config_file)
    if error:
        return [fail(name, f"not valid JSON: {error}", f"re-run {DOWNLOAD_COMMAND}")], None
    # The model package imports torch: only here, once the folder is there (the setup check starts without it).
    from internvl.model.hf_layout import ORIGINAL_LAYOUT, layout_of_config, read_model_config

    try:
        layout = layout_of_config(raw, config_file)
    except ValueError as error:
        return [fail(name, str(error), "point MODEL_PATH at an InternVL3 checkpoint (e.g. OpenGVLab/InternVL3-8B "
                                       "or OpenGVLab/InternVL3-8B-hf)")], None
    llm_sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    required = {
        # An -hf text_config may leave architectures out (its model_type names the LLM).
        **({"llm_config": ("architectures", *llm_sizes)} if layout == ORIGINAL_LAYOUT else {"text_config": llm_sizes}),
        "vision_config": ("hidden_size", "image_size", "patch_size", "num_hidden_layers", "intermediate_size"),
    }  # fmt: skip
    missing = [f"{part}.{key}" for part, keys in required.items()
               for key in keys if key not in (raw.get(part) or {})]
    if missing:
        return [fail(name, f"{config_file} lacks {', '.join(missing)}",
                     "restore config.json from the checkpoint's repository")], None
    try:
        config = read_model_config(path)
    except Exception as error:
        return [fail(name, f"{config_file} does not load: {error}",
                     "use an InternVL2.5/InternVL3 checkpoint with a Qwen2.5 or Llama language model")], None
    llm = config.llm_config
    results = [ok(name, f"{layout} layout, {llm.architectures[0]}, {llm.num_hidden_layers} layers, "
                        f"hidden {llm.hidden_size}, vocab {llm.vocab_size}, {config.num_image_token} tokens per {config.image_size}px tile")]
    # Training replaces the config's template and checks its downsample ratio with these arguments.
    template = data_args.conv_style if data_args else config.template
    if template not in (None, "internvl2_5"):
        results.append(warn(
            "chat template", f"the template is {template!r}; InternVL3 is trained with 'internvl2_5'",
            "use --conv_style internvl2_5 (other templates are known to collapse the loss)",
        ))
    if data_args and data_args.down_sample_ratio != config.downsample_ratio:
        results.append(fail(
            name, f"--down_sample_ratio {data_args.down_sample_ratio} differs from the checkpoint's "
            f"downsample_ratio {config.downsample_ratio} (the projector's input width depends on it)",
            f"drop --down_sample_ratio or set it to {config.downsample_ratio}",
        ))
    return results, config


def _check_weights(path: Path, config) -> list[CheckResult]:
    name = "weights"
    index_file = path / "model.safetensors.index.json"
    single_file = path / "model.safetensors"
    redownload = f"re-run {DOWNLOAD_COMMAND} (it resumes and fetches what is missing)"
    expected_bytes = None
    if index_file.is_file():
        index, error = read_json(index_file)
        if error:
            return [fail(name, f"index is not valid JSON: {error}", redownload)]
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            return [fail(name, f"{index_file} has no weight_map", redownload)]
        expected_bytes = (index.get("metadata") or {}).get("total_size")
        shards = sorted(set(weight_map.values()))
    elif single_file.is_file():
        weight_map, shards = {}, [single_file.name]
    elif list(path.glob("pytorch_model*.bin")):
        return [fail(name, f"{path} has only pytorch_model*.bin weights; this toolkit loads safetensors only",
                     "download the safetensors release of the checkpoint")]
    else:
        return [fail(name, f"neither model.safetensors.index.json nor model.safetensors in {path}", redownload)]

    missing = [shard for shard in shards if not (path / shard).is_file()]
    if missing:
        return [fail(name, f"{len(missing)} of {len(shards)} shards named in {index_file.name} are missing: "
                           f"{listing(missing)}", redownload)]
    from safetensors import safe_open

    from internvl.model.hf_layout import hf_disk_name, hf_names

    # The essential tensors' names in either layout: ours, transformers' own, and what transformers writes to disk.
    essential_names = {
        key: {key, *(name for hf_name in hf_names(key) for name in (hf_name, hf_disk_name(hf_name)))}
        for key in ESSENTIAL_TENSORS
    }
    shapes: dict[str, list[int]] = {}
    file_bytes, problems = 0, []
    for shard in shards:
        shard_path = path / shard
        shard_bytes = shard_path.stat().st_size
        try:
            # Reads only the header, and checks that the file is as long as the header says.
            with safe_open(shard_path, framework="pt") as f:
                keys = set(f.keys())
                shapes.update({
                    essential: list(f.get_slice(stored).get_shape())
                    for essential, names in essential_names.items() for stored in names if stored in keys
                })  # fmt: skip
        except Exception as error:
            hint = " (a Git LFS pointer: run git lfs pull)" if 0 < shard_bytes < 1024 else ""
            problems.append(f"{shard} ({shard_bytes} bytes{hint}): {error}")
            continue
        file_bytes += shard_bytes
        absent = sorted(k for k, s in weight_map.items() if s == shard and k not in keys)
        if absent:
            problems.append(f"{shard} lacks {len(absent)} tensors the index assigns to it, e.g. {absent[0]}")
    if problems:
        return [fail(name, f"damaged weight files: {listing(problems)}",
                     f"delete the damaged files and {redownload}")]
    if isinstance(expected_bytes, int) and file_bytes < expected_bytes:
        return [fail(name, f"the shards hold {file_bytes} bytes but the index declares {expected_bytes}",
                     redownload)]
    missing_tensors = [key for key in ESSENTIAL_TENSORS if key not in shapes]
    if missing_tensors:
        return [fail(name, f"no {', '.join(missing_tensors)} (or its -hf name) in {path}: not an InternVL "
                           "checkpoint", "point MODEL_PATH at an InternVL3 checkpoint (official or -hf layout)")]
    if config is not None:
        llm = config.llm_config
        embedding = shapes["language_model.model.embed_tokens.weight"]
        if embedding != [llm.vocab_size, llm.hidden_size]:
            return [fail(name, f"embed_tokens has shape {embedding} but config.json says [vocab_size, "
                               f"hidden_size] = [{llm.vocab_size}, {llm.hidden_size}]",
                         "config.json and the weights come from different checkpoints; download both again")]
    return [ok(name, f"{len(shards)} safetensors file(s), {size(file_bytes)}, every header readable and every "
                     "indexed tensor present")]


def _check_tokenizer(path: Path, config) -> tuple[list[CheckResult], Any]:
    name = "tokenizer"
    restore = ("use the tokenizer files shipped with the InternVL3 checkpoint (tokenizer_config.json, vocab.json, "
               "merges.txt / tokenizer.json): a plain Qwen2.5 tokenizer lacks the InternVL tokens")
    try:
        from internvl.model.loading import load_tokenizer

        tokenizer = load_tokenizer(path)
    except Exception as error:
        return [fail(name, f"does not load from {path}: {error}", restore)], None
    vocab = tokenizer.get_vocab()
    missing = [t for t in (*INTERNVL_SPECIAL_TOKENS, *CHATML_SPECIAL_TOKENS) if t not in vocab]
    split = [t for t in INTERNVL_SPECIAL_TOKENS
             if t in vocab and tokenizer(t, add_special_tokens=False)["input_ids"] != [vocab[t]]]
    if missing or split:
        problems = [f"lacks {', '.join(missing)}"] if missing else []
        problems += [f"splits {', '.join(split)} into several tokens"] if split else []
        return [fail(name, f"{path}: {'; '.join(problems)}", restore)], None
    if tokenizer.pad_token_id is None:
        return [fail(name, f"{path}: no pad token", restore)], None
    context_id = vocab[IMG_CONTEXT_TOKEN]
    if config is not None:
        vocab_size = config.llm_config.vocab_size
        stored_id = getattr(config, "img_context_token_id", None)
        if context_id >= vocab_size:
            return [fail(name, f"{IMG_CONTEXT_TOKEN} has id {context_id} but llm_config.vocab_size is "
                               f"{vocab_size}: the embedding has no row for it",
                         "the tokenizer belongs to another checkpoint; " + restore)], tokenizer
        if stored_id is not None and stored_id != context_id:
            return [fail(name, f"config.json stores img_context_token_id={stored_id} but the tokenizer gives "
                               f"{IMG_CONTEXT_TOKEN} the id {context_id}",
                         "the tokenizer and config.json come from different checkpoints; " + restore)], tokenizer
    return [ok(name, f"{len(tokenizer)} tokens, all InternVL and ChatML tokens present, "
                     f"{IMG_CONTEXT_TOKEN} = {context_id}")], tokenizer
