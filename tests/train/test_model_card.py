"""The model card of a training output: base model, data, recipe, metrics; never peft's empty template."""

from __future__ import annotations

from pathlib import Path

from internvl.train.arguments import parse_args
from internvl.train.model_card import MODEL_CARD_NAME, RunSummary, model_card_text, write_model_card
from tests.scripts.test_finetune import guide_training_args


def guide_run(tmp_path, **overrides) -> RunSummary:
    model_args, data_args, training_args = parse_args(guide_training_args() + ["--report_to", "none"])
    values = dict(
        model_args=model_args, data_args=data_args, training_args=training_args, num_train_samples=120,
        num_eval_samples=12, global_step=45, weights_step=40,
        train_metrics={"train_loss": 1.23456, "train_runtime": 100.0},
        eval_metrics={"eval_loss": 1.1, "eval_rougeL": 31.234, "eval_cider": 55.5, "epoch": 3.0},
        best_model_checkpoint=str(tmp_path / "checkpoint-40"), best_metric=33.3,
        launch_command="torchrun ... internvl/train/internvl_chat_finetune.py --use_llm_lora 32",
    )  # fmt: skip
    return RunSummary(**{**values, **overrides})


def test_the_card_tells_base_model_data_recipe_and_metrics(tmp_path):
    card = model_card_text(guide_run(tmp_path), tmp_path / "run")
    assert card.startswith("---\nbase_model: models/InternVL3-8B\nlibrary_name: peft\n")
    assert "More Information Needed" not in card
    for expected in [
        "- LoRA: rank 32, alpha 64, dropout 0.05 on the language model",
        "- frozen: vision tower, projector (mlp1), language model",
        "- base weights during training: 4-bit NF4 (bitsandbytes, double quantization on); compute in bf16",
        "- `internvl3_data/meta.json`: 120 training samples, 12 validation samples",
        "| optimizer steps | 45 (3 epochs) |",
        "| learning rate | 2e-05, cosine schedule, warm-up 0.03 |",
        "| DeepSpeed | zero_stage3_config.json |",
        "torchrun ... internvl/train/internvl_chat_finetune.py --use_llm_lora 32",
        "- training loss (mean over the run): 1.2346",
        "- evaluation of these weights (step 40):",
        "| eval loss | 1.1000 |",
        "| ROUGE-L | 31.23 |",
        "| CIDEr | 55.50 |",
        "- best checkpoint by eval_loss: `checkpoint-40` (33.3000)",
        f"python scripts/merge_lora.py {tmp_path / 'run'} {tmp_path / 'run'}-merged",
    ]:
        assert expected in card, expected


def test_a_run_without_evaluation_says_so(tmp_path):
    run = guide_run(tmp_path, train_metrics={}, eval_metrics=None, best_model_checkpoint=None, best_metric=None,
                    num_eval_samples=None, launch_command=None, num_train_samples=1)  # fmt: skip
    card = model_card_text(run, tmp_path)
    assert "- nothing was logged or evaluated" in card and "validation sample" not in card
    assert "`internvl3_data/meta.json`: 1 training sample\n" in card
    path = write_model_card(run, tmp_path)
    assert path == Path(tmp_path) / MODEL_CARD_NAME and path.read_text() == card


def test_saved_adapters_carry_no_peft_template(tiny_lora_output):
    assert not (tiny_lora_output / "README.md").exists()
    assert (tiny_lora_output / "adapter_model.safetensors").is_file()
