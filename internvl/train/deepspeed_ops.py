"""DeepSpeed's compiled ops: built once per Python environment, and announced before the build.

DeepSpeed compiles its optimizer ops (CPU Adam for optimizer offload, FusedAdam otherwise), and on its CPU
accelerator a communication op, the first time a run needs them, through torch's extension builder, which caches
them in ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). Environments that share that folder but
differ in compiler flags or paths keep rebuilding each other's ops, for minutes, and concurrent runs then wait on
each other's build lock. So a run started from a virtual environment keeps the cache inside it
(``<venv>/torch_extensions``), unless ``TORCH_EXTENSIONS_DIR`` is set; and the main process says when a build is
about to happen, instead of minutes of silence.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

TORCH_EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"
# What each op is, for the announcement.
CPU_COMMUNICATION_OP = "deepspeed_shm_comm"
OP_TITLES = {"cpu_adam": "CPU Adam (optimizer offload)", "fused_adam": "FusedAdam",
             CPU_COMMUNICATION_OP: "CPU communication"}
ADAM_TYPES = ("adam", "adamw")


def use_environment_build_cache(environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """Set ``TORCH_EXTENSIONS_DIR`` to ``<virtual environment>/torch_extensions`` unless it is set already; returns
    the folder ops are cached in, or None for torch's default (outside a virtual environment, or a read-only one)."""
    if environ.get(TORCH_EXTENSIONS_ENV):
        return Path(environ[TORCH_EXTENSIONS_ENV])
    if sys.prefix == sys.base_prefix or not os.access(sys.prefix, os.W_OK):
        return None
    folder = Path(sys.prefix) / "torch_extensions"
    environ[TORCH_EXTENSIONS_ENV] = str(folder)
    return folder


def extension_build_root(environ: MutableMapping[str, str] = os.environ) -> Path:
    """The folder torch builds extension ``NAME`` in, as ``<root>/NAME`` (torch's own rule: the variable as is, else
    its default root with a ``py311_cu130``-style subfolder)."""
    if environ.get(TORCH_EXTENSIONS_ENV):
        return Path(environ[TORCH_EXTENSIONS_ENV])
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if torch.version.hip is not None:
        accelerator = f"rocm{torch.version.hip.replace('.', '')}"
    elif torch.version.cuda is not None:
        accelerator = f"cu{torch.version.cuda.replace('.', '')}"
    else:
        accelerator = "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{accelerator}"


def optimizer_op(deepspeed_config: dict) -> str | None:
    """The op DeepSpeed's optimizer of this config needs: CPU Adam when the optimizer is offloaded (ZeRO-Offload
    replaces any optimizer with it), FusedAdam for an Adam / AdamW section, else none (a torch optimizer)."""
    zero = deepspeed_config.get("zero_optimization") or {}
    if (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme"):
        return "cpu_adam"
    optimizer = (deepspeed_config.get("optimizer") or {}).get("type", "")
    if str(optimizer).lower() in ADAM_TYPES and not (deepspeed_config.get("optimizer") or {}).get(
        "params", {}
    ).get("torch_adam"):
        return "fused_adam"
    return None


def op_is_built(name: str, environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether DeepSpeed was installed with the op prebuilt, or torch's cache holds a build of it."""
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(name):
        return True
    return (extension_build_root(environ) / name / f"{name}.so").is_file()


def ops_to_build(deepspeed_config: dict | None, environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """The ops this run will compile: its optimizer's, and on DeepSpeed's CPU accelerator its communication op."""
    if not deepspeed_config:
        return []
    from deepspeed.accelerator import get_accelerator

    needed = [optimizer_op(deepspeed_config)]
    if get_accelerator().device_name() == "cpu":
        needed.append(CPU_COMMUNICATION_OP)
    return [name for name in needed if name and not op_is_built(name, environ)]


def build_announcement(deepspeed_config: dict | None, environ: MutableMapping[str, str] = os.environ) -> str | None:
    """What to print before DeepSpeed compiles ops for this run, or None when they are built."""
    names = ops_to_build(deepspeed_config, environ)
    if not names:
        return None
    ops = " and ".join(OP_TITLES[name] for name in names)
    note = (
        f"Compiling DeepSpeed's {ops} op{'s' if len(names) > 1 else ''}: about a minute, once for this Python "
        f"environment (cached in {extension_build_root(environ)})."
    )
    # torch's builder waits, silently and forever, on the lock file of a build that was killed.
    locks = [extension_build_root(environ) / name / "lock" for name in names]
    for lock in filter(Path.is_file, locks):
        note += (f" {lock} is there: if no other run is compiling now, an earlier build was interrupted and this "
                 "run will wait for it forever; delete that file.")
    return note
