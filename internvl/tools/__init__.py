"""Tools around training: setup checks, model download, LoRA merge, inference, evaluation metrics and plots.

Modules are imported on use (``from internvl.tools.evaluate import run_evaluation``), so a setup check does not
pull in matplotlib or the metric packages. See docs/EVALUATION.md for merge, evaluation and inference.
"""
