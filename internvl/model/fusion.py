"""Fused kernels in the LLM, two ways, each behind a flag that is off by default.

``--use_liger True``: Liger-Kernel's fused Triton kernels for RMSNorm, SwiGLU MLP and RoPE. They are applied to the
model through Liger's own entry point for the architecture (``apply_liger_kernel_to_qwen2`` or
``apply_liger_kernel_to_llama`` with ``model=``): the two RMSNorms of every decoder layer, the final norm and every
MLP run Liger's forwards, and the architecture's ``apply_rotary_pos_emb`` becomes Liger's (a module-level
function, so it holds for every model of that architecture in the process, as in the official recipe). The loss is
left alone: the model computes logits only at the supervised positions itself (``InternVLChatModel.forward``), so
Liger's fused linear cross-entropy has nothing left to save. The vision tower keeps its own kernels.

The kernels need a CUDA GPU and the ``liger-kernel`` package (``requirements_gpu.txt``).

``--compile_llm_layers True``: regional ``torch.compile``, each decoder layer compiled on its own (they share one
compiled graph, so it compiles once, not once per layer). Inductor fuses the layer's elementwise work (norms, SwiGLU,
RoPE, the LoRA scaling and adds); the matmuls stay what they are. The first steps pay the compilation.
"""

from __future__ import annotations

import importlib
import importlib.util

import torch

# Liger's entry point per LLM architecture.
LIGER_ENTRY_POINTS = {
    "Qwen2ForCausalLM": "apply_liger_kernel_to_qwen2",
    "LlamaForCausalLM": "apply_liger_kernel_to_llama",
}
INSTALL_HINT = "pip install -r requirements_gpu.txt (liger-kernel)"


def check_liger_usable() -> None:
    """Raise, with the fix, unless Liger's kernels can run here (before minutes are spent loading the model)."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "--use_liger True needs CUDA GPUs: Liger's kernels are Triton GPU kernels. Pass --use_liger False to "
            "train on this machine."
        )
    if importlib.util.find_spec("liger_kernel") is None:
        raise ImportError(f"--use_liger True needs the liger-kernel package: {INSTALL_HINT}.")


def compile_decoder_layers(model) -> str:
    """Compile every LLM decoder layer of an ``InternVLChatModel`` in place (``nn.Module.compile``); returns what
    changed. Gradient checkpointing keeps working: the compiled layer checkpoints its own forward."""
    layers = model.base_language_model.model.layers
    for layer in layers:
        layer.compile()
    return f"torch.compile: each of the {len(layers)} LLM decoder layers compiled on its own (regional)."


def apply_liger_kernels(model) -> str:
    """Give the LLM of an ``InternVLChatModel`` Liger's RMSNorm, SwiGLU MLP and RoPE; returns what changed."""
    architecture = model.config.llm_config.architectures[0]
    if architecture not in LIGER_ENTRY_POINTS:
        raise ValueError(
            f"--use_liger True: no Liger kernels for a {architecture} LLM (supported: "
            f"{', '.join(LIGER_ENTRY_POINTS)}); pass --use_liger False."
        )
    try:
        liger = importlib.import_module("liger_kernel.transformers")
    except ImportError as error:
        raise ImportError(f"--use_liger True needs the liger-kernel package ({error}): {INSTALL_HINT}.") from None
    llm = model.base_language_model
    getattr(liger, LIGER_ENTRY_POINTS[architecture])(
        rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=llm
    )
    layers = llm.model.layers
    return (
        f"Liger kernels in the LLM: RMSNorm ({2 * len(layers) + 1} norms), SwiGLU ({len(layers)} MLPs) and RoPE "
        f"({architecture})."
    )
