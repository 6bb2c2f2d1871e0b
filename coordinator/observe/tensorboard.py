"""Per-round scalars in TensorBoard's event-file format (``torch.utils.tensorboard.SummaryWriter``).

Each job writes a run of its own, ``<folder>/<job>-<date>-<time>``, so that several jobs (or a job run
again) in one folder show as separate runs. The writer opens with the first evaluation, so a job that
fails before it leaves nothing behind. Tags: ``eval/loss``, ``eval/perplexity``, ``eval/accuracy``,
``train/loss``, ``train/tokens``, ``round/seconds``, ``round/step_seconds`` (the slowest device's mean
step, as the coordinator times it), ``controller/predicted_step_seconds``, ``controller/ideal_step_seconds``,
``bytes/up``, ``bytes/down``, and per device ``cut/<agent>``, in the U split ``tail/<agent>``, and
``step_seconds/<agent>`` (its mean step as it timed it, the sum of the parts the dashboard shows); the global step is the round (round 0: the base before training).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from splitft.coordinator.progress import Event
from splitft.shared.errors import ConfigError


def check_writable(folder: Path) -> None:
    """Raise a ConfigError saying why not if ``folder`` cannot be made and written (before the job starts);
    the folders made to find out are removed again (the writer makes them when the job starts)."""
    missing = folder
    while not missing.parent.exists() and missing.parent != missing:
        missing = missing.parent
    made = missing if not missing.exists() else None
    probe = folder / ".splitft-write-test"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--tensorboard {folder}: cannot write there ({exc.strerror or exc})") from exc
    finally:
        if made is not None and made.is_dir():
            shutil.rmtree(made, ignore_errors=True)


class TensorBoardLog:
    def __init__(self, folder: Path, job: str) -> None:
        self.folder = folder / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}"
        self._writer: Any = None

    def writer(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.folder.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(self.folder))
        return self._writer

    def update(self, event: Event, data: dict[str, Any]) -> None:
        if event not in (Event.BASELINE, Event.ROUND_END):
            return
        writer = self.writer()
        r, add = int(data["round"]), writer.add_scalar
        add("eval/loss", data["eval_loss"], r)
        add("eval/perplexity", data["eval_ppl"], r)
        add("eval/accuracy", data["eval_acc"], r)
        if event == Event.ROUND_END:
            if data.get("train_loss") is not None:
                add("train/loss", data["train_loss"], r)
            add("train/tokens", data["train_tokens"], r)
            add("round/seconds", data["round_time_s"], r)
            add("round/step_seconds", data["step_time_s"], r)
            add("bytes/up", data["bytes_up"], r)
            add("bytes/down", data["bytes_down"], r)
            for name, a in data["agents"].items():
                add(f"cut/{name}", a["cut"], r)
                if "tail" in a:
                    add(f"tail/{name}", a["tail"], r)
                timings = a.get("timings") or {}
                if a["dropped"] is None and "step_s" in timings:
                    add(f"step_seconds/{name}", timings["step_s"], r)
            decision = data.get("controller")
            if decision is not None:
                add("controller/predicted_step_seconds", decision["predicted_step_s"], r)
                add("controller/ideal_step_seconds", decision["ideal_step_s"], r)
        writer.flush()  # a round is minutes apart: TensorBoard sees it at once

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
