"""DeepSpeed's compiled ops: cached inside the virtual environment, and the build announced when it will happen."""

from __future__ import annotations

import sys

import pytest
from deepspeed.accelerator import get_accelerator

from internvl.train import deepspeed_ops
from internvl.train.deepspeed_ops import (
    TORCH_EXTENSIONS_ENV,
    build_announcement,
    extension_build_root,
    ops_to_build,
    optimizer_op,
    use_environment_build_cache,
)

OFFLOAD = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}, "optimizer": {"type": "AdamW"}}
NO_OFFLOAD = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}


def test_the_build_cache_goes_into_the_virtual_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    (tmp_path / "venv").mkdir()
    environ = {}
    assert use_environment_build_cache(environ) == tmp_path / "venv" / "torch_extensions"
    assert environ == {TORCH_EXTENSIONS_ENV: str(tmp_path / "venv" / "torch_extensions")}
    # torch then builds NAME in <folder>/NAME, without its py311_cu130-style subfolder.
    assert extension_build_root(environ) == tmp_path / "venv" / "torch_extensions"

    chosen = {TORCH_EXTENSIONS_ENV: str(tmp_path / "mine")}  # a folder the user chose is kept
    assert use_environment_build_cache(chosen) == tmp_path / "mine" and chosen[TORCH_EXTENSIONS_ENV] == str(
        tmp_path / "mine"
    )


def test_outside_a_virtual_environment_torch_keeps_its_default(monkeypatch):
    monkeypatch.setattr(sys, "base_prefix", sys.prefix)
    environ = {}
    assert use_environment_build_cache(environ) is None and environ == {}
    assert extension_build_root(environ).parent.name == "torch_extensions"


@pytest.mark.parametrize(
    "config, op",
    [
        (OFFLOAD, "cpu_adam"),
        (NO_OFFLOAD, "fused_adam"),
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}, None),
        ({"zero_optimization": {"stage": 2}}, None),  # the Trainer's torch optimizer
        ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}, "optimizer": {"type": "SGD"}},
         None),
    ],
)  # fmt: skip
def test_which_op_the_config_compiles(config, op):
    assert optimizer_op(config) == op


def built(folder, name):
    (folder / name).mkdir()
    (folder / name / f"{name}.so").write_bytes(b"")


def test_the_build_is_announced_until_the_ops_are_cached(monkeypatch, tmp_path):
    monkeypatch.setattr("deepspeed.git_version_info.installed_ops", {"cpu_adam": False})
    environ = {TORCH_EXTENSIONS_ENV: str(tmp_path)}
    on_cpu = get_accelerator().device_name() == "cpu"
    expected = "CPU Adam (optimizer offload) and CPU communication ops" if on_cpu else "CPU Adam (optimizer offload) op"
    assert build_announcement(OFFLOAD, environ) == (
        f"Compiling DeepSpeed's {expected}: about a minute, once for this Python environment (cached in {tmp_path})."
    )
    (tmp_path / "cpu_adam").mkdir()
    (tmp_path / "cpu_adam" / "lock").write_bytes(b"")  # left by a build that was killed
    assert build_announcement(OFFLOAD, environ).endswith(
        f"{tmp_path / 'cpu_adam' / 'lock'} is there: if no other run is compiling now, an earlier build was "
        "interrupted and this run will wait for it forever; delete that file."
    )
    (tmp_path / "cpu_adam" / "lock").unlink()
    (tmp_path / "cpu_adam").rmdir()
    built(tmp_path, "cpu_adam")
    built(tmp_path, "deepspeed_shm_comm")
    assert ops_to_build(OFFLOAD, environ) == []
    assert build_announcement(OFFLOAD, environ) is None
    assert build_announcement(None, environ) is None  # DeepSpeed off

    monkeypatch.setattr("deepspeed.git_version_info.installed_ops", {"fused_adam": True})  # prebuilt wheel
    assert deepspeed_ops.op_is_built("fused_adam", environ)
