"""The distributed checks (internvl.bench.distributed_checks): the judgements on planted faults (an adapter saved from
an un-gathered ZeRO-3 partition or a stale step, a resume that skips or repeats data, a kill that hangs or is not
named), then the three runs through the recipe with 2 CPU processes (gloo), which must pass."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from internvl.bench.distributed_checks import (
    RESUME_TOLERANCE,
    CheckSettings,
    adapter_key,
    check_collectives,
    compare_adapter,
    compare_resumed_steps,
    compare_weights,
    failed_processes,
    judge_kill,
    judge_resume,
    run_checks,
)
from internvl.bench.distributed_worker import backend_for_device, collectives_path

MASTER_PREFIX = "language_model.base_model.model.model.layers.0.self_attn.q_proj"
SAVED_PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"

# The failure summary torchrun (torch.distributed.elastic) printed when rank 1 of 2 was killed on this machine.
TORCHRUN_FAILURE = """
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
internvl.bench.distributed_worker FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-12-02_02:30:11
  host      : worker
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 4242)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 4242
============================================================
"""


def master_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        f"{MASTER_PREFIX}.lora_A.default.weight": torch.randn(4, 8, generator=generator),
        f"{MASTER_PREFIX}.lora_B.default.weight": torch.randn(8, 4, generator=generator) * 1e-3,
        "vision_model.frozen_but_listed": torch.zeros(2),  # not an adapter weight: not compared
    }


def saved_from(master: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a right save writes: each LoRA weight cast to bf16, under peft's key."""
    return {adapter_key(name): value.to(torch.bfloat16) for name, value in master.items() if adapter_key(name)}


def test_adapter_keys_are_peft_keys_without_the_adapter_name():
    assert adapter_key(f"{MASTER_PREFIX}.lora_B.default.weight") == f"{SAVED_PREFIX}.lora_B.weight"
    assert adapter_key("vision_model.encoder.layers.0.mlp.fc1.weight") is None


def test_the_saved_adapter_must_equal_the_fp32_master_cast_to_bf16_bit_for_bit():
    master = master_weights()
    result = compare_adapter(saved_from(master), master)
    assert result["ok"] and result["differing_elements"] == 0 and result["saved_dtypes"] == ["torch.bfloat16"]

    # Saved from an un-gathered ZeRO-3 partition: the rank's view of a partitioned parameter is empty.
    ungathered = {**saved_from(master), f"{SAVED_PREFIX}.lora_B.weight": torch.empty(0, dtype=torch.bfloat16)}
    result = compare_adapter(ungathered, master)
    assert not result["ok"] and result["wrong_shape"]

    # Saved before the last optimizer step (stale): a single element off is already a failure.
    stale = saved_from(master)
    stale[f"{SAVED_PREFIX}.lora_A.weight"][0, 0] *= 1.05
    result = compare_adapter(stale, master)
    assert not result["ok"] and result["differing_elements"] == 1

    # A tensor left out, or an untrained adapter (lora_B still zero), fails too.
    assert compare_adapter({k: v for k, v in saved_from(master).items() if "lora_A" not in k}, master)["missing"]
    untrained = {k: (v * 0 if "lora_B" in k else v) for k, v in master.items()}
    assert not compare_adapter(saved_from(untrained), untrained)["ok"]


def records(steps: int, micro_batches: int = 2, ranks: int = 2, offset: float = 0.0) -> dict:
    """Step records of a run: the inputs of (step, micro-batch, rank) are sample number (step, micro, rank)."""
    return {
        (s, m, r): {"step": s, "micro_batch": m, "rank": r, "inputs": f"sample-{s}-{m}-{r}", "loss": 7.0 + s + offset}
        for s in range(1, steps + 1)
        for m in range(micro_batches)
        for r in range(ranks)
    }


def only(run: dict, keep) -> dict:
    return {key: value for key, value in run.items() if keep(key)}


def test_resumed_steps_must_see_the_same_inputs_as_the_uninterrupted_run():
    reference = records(4)
    killed = only(records(4), lambda key: key <= (3, 0, 1))  # killed in step 3
    resumed = only(records(4), lambda key: key[0] > 2)
    result = compare_resumed_steps(reference, killed, resumed, resumed_at=2)
    assert not (result["repeated"] or result["missing"] or result["extra"] or result["other_inputs_count"])
    assert result["loss_rel_difference_after_resume"] == 0.0 and result["resumed_micro_batches"] == 8

    # The resumed run skipped a micro-batch's samples (it trained on the next ones): other inputs from there on.
    shifted = {key: {**value, "inputs": reference.get((key[0], key[1] + 1, key[2]), {"inputs": "x"})["inputs"]}
               for key, value in resumed.items()}  # fmt: skip
    assert compare_resumed_steps(reference, killed, shifted, resumed_at=2)["other_inputs_count"] == 8
    # It started the epoch over (repeated data): the inputs of steps 1-2 again in steps 3-4.
    restarted = {key: {**value, "inputs": reference[(key[0] - 2, key[1], key[2])]["inputs"]}
                 for key, value in resumed.items()}  # fmt: skip
    assert compare_resumed_steps(reference, killed, restarted, resumed_at=2)["other_inputs_count"] == 8
    # It ran step 2 again, or left step 4 out.
    again = {**resumed, **only(records(4), lambda key: key[0] == 2)}
    assert compare_resumed_steps(reference, killed, again, resumed_at=2)["repeated"]
    assert compare_resumed_steps(reference, killed, only(resumed, lambda k: k[0] < 4), resumed_at=2)["missing"]


def test_the_resume_verdict_uses_the_device_tolerance():
    reference = records(4)
    steps = compare_resumed_steps(reference, only(reference, lambda k: k[0] <= 2),
                                  only(records(4, offset=5e-3), lambda k: k[0] > 2), resumed_at=2)  # fmt: skip
    same = compare_weights(saved_from(master_weights()), saved_from(master_weights()))
    assert same["max_abs_difference"] == 0.0 and same["lora_B_rel_difference"] == 0.0
    other = compare_weights(saved_from(master_weights(1)), saved_from(master_weights()))
    assert other["lora_B_rel_difference"] > 0.5
    arguments = dict(resumed_at=2, kill_after_step=2, final_step=4, planned_steps=4)
    # Losses 5e-3 / 11 apart (relative 5e-4): over the CPU's tolerance, within the GPU's.
    assert not judge_resume(steps, same, same, RESUME_TOLERANCE["cpu"], **arguments)["ok"]
    assert judge_resume(steps, same, same, RESUME_TOLERANCE["cuda"], **arguments)["ok"]
    assert not judge_resume(steps, other, same, RESUME_TOLERANCE["cuda"], **arguments)["ok"]
    broken = {**steps, "non_finite_losses": 2, "loss_rel_difference_after_resume": float("nan")}
    assert not judge_resume(broken, same, same, RESUME_TOLERANCE["cuda"], **arguments)["ok"]
    early = {**arguments, "resumed_at": 1}
    assert "before the complete checkpoint-2" in judge_resume(steps, same, same, RESUME_TOLERANCE["cuda"],
                                                              **early)["problems"][0]  # fmt: skip


def kill_verdict(**changes) -> dict:
    arguments = dict(returncode=1, exit_seconds=3.0, timeout_s=120.0, log_text=TORCHRUN_FAILURE, kill_rank=1,
                     leftovers=[], finished=False)  # fmt: skip
    return judge_kill(**{**arguments, **changes})


def test_the_kill_verdict_needs_a_clear_end_of_the_whole_job():
    assert failed_processes(TORCHRUN_FAILURE) == [(1, -signal.SIGKILL)]
    verdict = kill_verdict()
    assert verdict["ok"] and "rank      : 1 (local_rank: 1)" in verdict["summary"]
    assert "hang" in kill_verdict(returncode=None)["problems"][0]
    assert not kill_verdict(returncode=0)["ok"]
    assert not kill_verdict(kill_rank=2)["ok"]  # the summary names another rank
    assert not kill_verdict(log_text="Traceback: connection reset")["ok"]
    assert "still running" in kill_verdict(leftovers=[4243])["problems"][0]
    assert not kill_verdict(finished=True)["ok"]


def test_the_backend_that_serves_the_training_device():
    assert backend_for_device("nccl", torch.device("cuda", 0)) == "nccl"
    assert backend_for_device("cuda:nccl,cpu:gloo", torch.device("cuda", 1)) == "nccl"
    assert backend_for_device("cuda:nccl,cpu:gloo", torch.device("cpu")) == "gloo"


def collectives_report(rank: int, backend: str = "gloo", held: int = 50, values_ok: bool = True) -> dict:
    return {"rank": rank, "world_size": 2, "device": "cpu", "backend": backend, "expected_backend": "gloo",
            "values": {"all_reduce_sum": True, "all_gather_bf16": values_ok},
            "bandwidth": {"all_gather_bus_gb_per_s": 0.1}, "trainable": {"held_elements": held, "full_elements": 100}}  # fmt: skip


def test_collectives_verdict(tmp_path):
    def write(*reports):
        for report in reports:
            collectives_path(tmp_path, report["rank"]).write_text(json.dumps(report))
        return check_collectives(tmp_path, world_size=2)

    result = write(collectives_report(0), collectives_report(1))
    assert result["ok"] and result["backends"] == ["gloo"] and result["lora_partitioned"]
    assert not write(collectives_report(0), collectives_report(1, backend="mpi"))["ok"]
    assert not write(collectives_report(0), collectives_report(1, values_ok=False))["ok"]
    # Every process holding all the trainable weights: ZeRO-3 did not partition them (reported, not a failure).
    assert not write(collectives_report(0, held=100), collectives_report(1, held=100))["lora_partitioned"]
    collectives_path(tmp_path, 1).unlink()
    assert "rank 1 wrote no report" in check_collectives(tmp_path, world_size=2)["problems"]


@pytest.mark.e2e
def test_two_cpu_processes_pass_every_check(tmp_path):
    """The recipe with 2 gloo processes, ZeRO-3 + offload, every parameter partitioned: collectives, the saved
    adapter against DeepSpeed's fp32 copy, and a run whose rank 1 is killed after checkpoint 2, then resumed."""
    settings = CheckSettings(nproc_per_node=2, work_dir=str(tmp_path), loader_workers=1)
    report = run_checks(settings, log=lambda line: None)
    checks = report["checks"]
    assert report["status"] == "ok", json.dumps(checks, indent=2)[-6000:]

    collectives = checks["collectives"]
    assert collectives["backends"] == ["gloo"] and collectives["devices"] == ["cpu", "cpu"]
    # ZeRO-3 split the LoRA weights between the two processes: the save had to gather them.
    assert collectives["lora_partitioned"]
    held = collectives["trainable_elements_held_per_rank"]
    assert all(share < collectives["trainable_elements"] for share in held)

    for where in ("final", "checkpoint-4"):
        adapter = checks["adapter"][where]
        assert adapter["differing_elements"] == 0 and adapter["trained"] and adapter["saved_dtypes"] == ["torch.bfloat16"]
        assert adapter["elements"] == collectives["trainable_elements"]

    kill = checks["kill"]
    assert (1, -signal.SIGKILL) in kill["failed_processes"] and kill["exit_seconds"] < settings.exit_timeout_s

    resume = checks["resume"]
    assert resume["resumed_at"] >= 2
    steps = resume["steps"]
    # 4 steps x 2 micro-batches x 2 ranks, the ones after the resume among them, each on the same samples; the
    # steps before the kill repeat the uninterrupted run bit for bit, the resumed ones within CPU Adam's rounding.
    assert steps["micro_batches"] == 16 and steps["resumed_micro_batches"] == 4 * (4 - resume["resumed_at"])
    assert steps["other_inputs_count"] == 0 and steps["loss_rel_difference_before_kill"] == 0.0
    assert steps["loss_rel_difference_after_resume"] <= RESUME_TOLERANCE["cpu"].loss_rtol
    assert resume["adapter"]["lora_B_rel_difference"] <= RESUME_TOLERANCE["cpu"].weight_rel
