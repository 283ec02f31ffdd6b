"""Metrics of a resumed run: TensorBoard keeps what was logged up to the checkpoint and drops what came after."""

from __future__ import annotations

import time

import torch

from dolphin_forge.config import ForgeConfig
from dolphin_forge.train.metrics import MetricsSink


def test_resumed_tensorboard_keeps_the_checkpoint_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    killed = MetricsSink(tmp_path, ForgeConfig(), enabled=True)
    for step in (1, 2, 3, 4):  # checkpoint at step 2, killed after logging steps 3 and 4
        killed.log("train", step, {"loss": float(step)})
    killed.close()
    # TensorBoard reads event files in name order: seconds, host, pid, then a per-process counter that sorts "10"
    # before "9"; a real resume is a later second, which this test's two writers in one process must be too
    time.sleep(1.1)
    resumed = MetricsSink(tmp_path, ForgeConfig(), enabled=True, resumed_step=2)
    for step in (3, 4, 5):
        resumed.log("train", step, {"loss": 10.0 + step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]


def test_matmul_parameters_count_layer_shapes_not_stored_elements():
    """Under ZeRO-3 a weight is an empty placeholder outside its forward (4-bit weights pack two values per byte):
    MFU must still count the matmul the layer does."""
    from dolphin_forge.train.metrics import matmul_parameters

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Embedding(100, 64), torch.nn.Linear(32, 8))
    assert matmul_parameters(model) == 64 * 32 + 32 * 8
    model[0].weight = torch.nn.Parameter(torch.empty(0))  # as deepspeed.zero.Init partitions it
    assert matmul_parameters(model) == 64 * 32 + 32 * 8
