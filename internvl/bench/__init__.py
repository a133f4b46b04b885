"""Benchmarks of the recipe itself, on random weights and synthetic inputs (see docs/BENCHMARKS.md, docs/DATA.md).

Training throughput and memory: ``run`` writes the inputs (``inputs``) and starts the recipe under ``torchrun`` with
``worker`` as the entry point of each process; there ``meter`` times every optimizer step inside the trainer,
``flops`` counts the model's FLOPs for MFU and ``report`` turns the measurements into the JSON report.
Data-loading throughput: ``data``. What only several processes show (collectives, the saved adapter against
DeepSpeed's fp32 copy, resume after a killed rank): ``distributed_checks``, with ``distributed_worker`` in each
process.
"""
