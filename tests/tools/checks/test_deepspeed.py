"""The DeepSpeed config check: JSON syntax with its position, DeepSpeed's own ZeRO schema, the config handed on."""

from __future__ import annotations

import json

from internvl.tools.checks import Status, deepspeed
from tests.tools.checks.test_settings import REPO, context_for


def test_deepspeed_config_syntax_and_schema(good_setup, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('{\n  "zero_optimization": {"stage": 3,}\n}\n')
    [result], context = deepspeed.check_config(context_for(good_setup, DEEPSPEED_CONFIG=str(broken)))
    assert result.status == Status.FAIL and f"{broken}:2:" in result.message
    assert context.deepspeed_config is None

    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_parmas": {"device": "cpu"}}}))
    results, _ = deepspeed.check_config(context_for(good_setup, DEEPSPEED_CONFIG=str(typo)))
    assert results[0].status == Status.FAIL and "offload_parmas" in results[0].message


def test_a_valid_config_is_handed_on(good_setup):
    shipped = REPO / "configs" / "zero_stage3_config.json"
    results, context = deepspeed.check_config(context_for(good_setup, DEEPSPEED_CONFIG=str(shipped)))
    assert results[0].status == Status.OK and "ZeRO stage 3" in results[0].message
    assert context.deepspeed_config == json.loads(shipped.read_text())


def test_an_arch_list_deepspeed_cannot_parse_is_reported_with_what_training_does(good_setup, monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    [result] = deepspeed._check_arch_list()
    assert result.status == Status.OK and "'8.0;9.0a' set to '8.0;9.0'" in result.message
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    assert deepspeed._check_arch_list() == []


def test_the_ops_check_says_whether_deepspeed_will_compile_and_where_it_caches(monkeypatch, tmp_path):
    from internvl.train.deepspeed_ops import ops_to_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    config = json.loads((REPO / "configs" / "zero_stage3_config.json").read_text())
    pending = ops_to_build(config)
    assert "cpu_adam" in pending  # optimizer offload, nothing cached in the empty folder yet
    [result] = deepspeed._check_ops(config)
    assert result.status == Status.OK and "CPU Adam (optimizer offload)" in result.message
    assert f"compile on the first run: about a minute, once, cached in {tmp_path}" in result.message
    for name in pending:
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}.so").write_bytes(b"")
    assert deepspeed._check_ops(config)[0].message == f"compiled already (cache: {tmp_path})"
