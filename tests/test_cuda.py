"""The CUDA path on a real GPU: stages on ``cuda:k % device_count``, parity with the unsplit model trained on
the GPU, in-process and over RPC, and the shipped examples with ``device=cuda``.

Skipped where no CUDA device is visible (CI); run on a GPU machine with ``pytest tests/test_cuda.py``.
The tolerance is 1e-4, not the CPU tests' 1e-5: the GPU's kernels may reduce in another order when a
micro-batch, not the whole batch, goes through them.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
import torch
from conftest import (
    SMALL_SGD_RUN,
    assert_run_equals_unsplit,
    assert_same_training,
    make_config,
    run_command,
    train_pipelined,
    train_unsplit,
)

from pipetrain.build import build_stages
from pipetrain.schedule import Action, ActionKind
from pipetrain.topology import Topology
from pipetrain.transport.shm import ShmChannel

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.timeout(300),
]

GPU_TOLERANCE = 1e-4


@pytest.fixture(autouse=True)
def _exact_float32_matmuls():
    """TF32 would make the pipelined and the unsplit run differ by far more than float32 rounding."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_each_worker_holds_its_stages_on_its_own_gpu():
    count = torch.cuda.device_count()
    topology = Topology(placement=(0, 1, 2, 3))
    expected = [torch.device("cuda", w % count) for w in range(4)]
    assert [topology.device("cuda", w) for w in range(4)] == expected
    # Under torchrun on the driver's node, rank 0 (the driver) takes no GPU: worker w is local rank w + 1.
    assert [topology.device("cuda", w, local_rank=w + 1, rank=w + 1) for w in range(4)] == expected
    cfg = make_config("mlp", 2, "1f1b")
    cfg.device = "cuda"
    _, stages = build_stages(cfg)
    for stage in stages:
        assert stage.device.type == "cuda"
        assert all(p.device == stage.device for p in stage.module.parameters()), stage.stage_idx


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="shared memory plane: Linux")
def test_the_shm_plane_takes_values_off_one_gpu_and_delivers_them_on_the_consumer_s():
    name = uuid.uuid4().hex[:16]
    consumer_device = torch.device("cuda", torch.cuda.device_count() - 1)
    producer = ShmChannel(name, 0, 0, 30.0, "cuda:0")
    consumer = ShmChannel(name, 0, 1, 30.0, consumer_device)
    action = Action(0, ActionKind.FORWARD, 3)
    hidden = torch.randn(6, 4, device="cuda:0").t()  # not contiguous
    mask = torch.rand(4, 6, device="cuda:0") > 0.5
    producer.send(1, 1, action, ((hidden, {"mask": mask, "half": hidden.bfloat16()}), 1.0))
    (got, extra), _ = consumer.receive(1, 0, action).wait()
    for sent, received in [(hidden, got), (mask, extra["mask"]), (hidden.bfloat16(), extra["half"])]:
        assert received.device == consumer_device and received.dtype == sent.dtype
        assert torch.equal(received.cpu(), sent.cpu())


@pytest.mark.parametrize("model", ["mlp", "gpt"])
@pytest.mark.parametrize(
    "schedule,num_stages,stages_per_worker",
    [("gpipe", 2, 1), ("1f1b", 3, 1), ("interleaved_1f1b", 4, 2), ("zb_h1", 2, 1), ("zb_v", 4, 2)],
    ids=["gpipe", "1f1b", "interleaved", "zb_h1", "zb_v"],
)
def test_in_process_training_on_cuda_equals_unsplit_on_cuda(model, schedule, num_stages, stages_per_worker):
    cfg = make_config(model, num_stages, schedule, num_microbatches=4, steps=6)
    cfg.pipeline.stages_per_worker = stages_per_worker
    cfg.device = "cuda"
    assert_same_training(*train_pipelined(cfg), *train_unsplit(cfg, device="cuda"), tolerance=GPU_TOLERANCE)


def test_bf16_training_on_cuda_runs_and_learns():
    cfg = make_config("gpt", 2, "1f1b", num_microbatches=4, steps=20)
    cfg.device = "cuda"
    cfg.precision = "bf16"
    losses, state = train_pipelined(cfg)
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert all(value.dtype == torch.float32 for value in state.values() if value.is_floating_point())


def _train(run_dir: Path, overrides: list[str], timeout: float = 240):
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "pipetrain.train", f"run_dir={run_dir}", *overrides]
    return run_command(args, timeout, cwd=run_dir)


def _logged(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "split",
    [
        ["schedule=1f1b", "pipeline.balance=[3,3]"],
        ["schedule=interleaved_1f1b", "pipeline.balance=[2,1,2,1]", "pipeline.stages_per_worker=2"],
        ["schedule=zb_v", "pipeline.balance=[2,1,2,1]", "pipeline.stages_per_worker=2"],
    ],
    ids=["1f1b", "interleaved", "zb_v"],
)
def test_rpc_training_on_cuda_equals_unsplit_on_cuda(tmp_path, split):
    overrides = [*SMALL_SGD_RUN, "pipeline.num_microbatches=4", "device=cuda", *split]
    result = _train(tmp_path, overrides)
    assert result.returncode == 0, result.output[-4000:]
    logged = assert_run_equals_unsplit(tmp_path, overrides, device="cuda", tolerance=GPU_TOLERANCE)
    # Only a worker whose stages sit on a GPU logs its peak GPU memory.
    assert all(logged[-1][f"worker{k}/device_memory_mib"] > 0 for k in range(2)), logged[-1]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["experiment=gpt"],
        ["experiment=resnet18"],
        ["experiment=resnet18", "pipeline.deferred_batchnorm=true", "precision=bf16"],
    ],
    ids=["default", "gpt", "resnet18", "resnet18-deferred-bn-bf16"],
)
def test_shipped_examples_train_on_cuda(tmp_path, overrides):
    result = _train(tmp_path, [*overrides, "device=cuda", "train.steps=20", "train.log_every=5"])
    assert result.returncode == 0, result.output[-4000:]
    logged = _logged(tmp_path)
    losses = [entry["train/loss"] for entry in logged]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0], losses
    assert all(entry["worker0/device_memory_mib"] > 0 for entry in logged)
