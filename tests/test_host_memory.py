"""``train.keep_host_memory``: a process keeps the memory it frees, so a step's large tensors stop faulting
their pages in again.

Each case runs in a fresh interpreter (glibc's settings are per process) and counts the minor page faults
of each step of a small training loop: micro-batches forward and backward through 1024-wide layers, then
an AdamW step, as a stage runs them.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest
import torch

from pipetrain.host_memory import resident_bytes

FAULTS_PER_STEP = """
import ctypes, json, resource, sys, torch
from pipetrain.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    kept = keep_freed_memory()
else:  # a fixed threshold turns glibc's sliding one off: every block of 128 KiB or more goes back
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    kept = not (mallopt(-3, 128 * 1024) and mallopt(-1, 128 * 1024))
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024))
optimizer = torch.optim.AdamW(model.parameters())
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        model(torch.randn(32, 1024)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _faults_per_step(mode: str) -> tuple[bool | None, list[int]]:
    result = subprocess.run(
        [sys.executable, "-c", FAULTS_PER_STEP, mode],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    figures = json.loads(result.stdout)
    return figures["kept"], figures["faults"][4:]  # steady state: the first steps grow the heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
@pytest.mark.timeout(240)
def test_a_training_loop_stops_faulting_pages_in_once_its_memory_is_kept():
    kept, faults_kept = _faults_per_step("keep")
    given_back, faults_given_back = _faults_per_step("give-back")
    assert kept is True and given_back is False
    weight_pages = 1024 * 1024 * 4 // 4096
    assert statistics.median(faults_kept) < 0.1 * weight_pages, faults_kept
    # The same loop with every large block given back faults each weight gradient's pages in every step,
    # and the count sees it. (glibc's own default slides its threshold up as blocks are freed, so how much
    # it gives back depends on the machine's history: not a fixed point to compare with.)
    assert statistics.median(faults_given_back) > weight_pages, faults_given_back


def test_resident_bytes_counts_memory_the_process_touches():
    """A 256 MiB tensor, filled, adds about that much to what the process holds; freed, it may stay."""
    before = resident_bytes()
    assert before is not None and before > 0
    block = torch.ones(64 * 2**20)  # 256 MiB of float32
    grown = resident_bytes()
    assert grown - before > 200 * 2**20, (before, grown)
    del block
