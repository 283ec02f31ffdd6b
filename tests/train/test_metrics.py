"""Metrics of a resumed run: TensorBoard keeps what was logged up to the checkpoint and drops what came after."""

from __future__ import annotations

from dolphin_forge.config import ForgeConfig
from dolphin_forge.train.metrics import MetricsSink


def test_resumed_tensorboard_keeps_the_checkpoint_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    killed = MetricsSink(tmp_path, ForgeConfig(), enabled=True)
    for step in (1, 2, 3, 4):  # checkpoint at step 2, killed after logging steps 3 and 4
        killed.log("train", step, {"loss": float(step)})
    killed.close()
    resumed = MetricsSink(tmp_path, ForgeConfig(), enabled=True, resumed_step=2)
    for step in (3, 4, 5):
        resumed.log("train", step, {"loss": 10.0 + step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert logged == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0), (5, 15.0)]
