"""The coordinator's side of private adapters (shared/wire/sealed.py): it relays, never opens.

With ``private_adapters = true`` the adapters of blocks ``0..c_min-1`` (every device holds them, the server never
runs them) reach the coordinator only sealed with the fleet key, which it does not hold. It keeps the sealed
uploads of the last applied round, in the order and with the weights its own aggregation gives the clear
adapters, and relays them in every assignment; its own copy of those blocks stays at the job's initial adapters
(public: seeded, trained on nothing), which the first round's assignments carry in clear. Checkpoints keep the
sealed uploads (as sealed), so that a resumed job relays them again; the exported adapter folder keeps them in
``private.json`` for ``splitft-coordinator unseal`` (whoever holds the fleet key) to complete the adapter.
"""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from splitft.coordinator.roster import Participant
from splitft.shared.errors import ConfigError, JobError, WireError
from splitft.shared.job.config import JobConfig
from splitft.shared.model.lora import block_of
from splitft.shared.wire.sealed import MAX_SEALED, SealedUpload, average_sealed

PRIVATE_FILE = "private.json"
ADAPTER_FILE = "adapter_model.safetensors"


class PrivateAdapters:
    """The private blocks of a job (none unless ``private_adapters``) and the sealed uploads relayed for them."""

    def __init__(self, job: JobConfig) -> None:
        self.job = job.job
        self.blocks = job.c_min if job.private_adapters else 0
        self.sealed: list[SealedUpload] = []  # the last applied round's, in aggregation order

    def is_private(self, name: str) -> bool:
        return block_of(name) < self.blocks

    def to_send(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A device's adapters as its assignment carries them: the private blocks' only while they are the
        initial ones (no sealed upload yet)."""
        if not self.blocks or not self.sealed:
            return dict(state)
        return {n: t for n, t in state.items() if not self.is_private(n)}

    def check_round(self, participants: int) -> None:
        if self.blocks and participants > MAX_SEALED:
            raise JobError(
                f"{participants} devices in a round: a job with private adapters runs rounds of at most {MAX_SEALED} "
                "(every device downloads every device's sealed adapters)"
            )

    def keep(
        self,
        round_: int,
        uploads: Sequence[tuple[float, Mapping[str, torch.Tensor]]],
        participants: Mapping[str, Participant],
    ) -> None:
        """The round is applied: keep its sealed uploads, those of the clear uploads kept, in the same order and
        with the same weights as the aggregation of the clear ones."""
        if not self.blocks:
            return
        by_upload = {id(p.upload): p for p in participants.values() if p.upload is not None}
        kept = []
        for weight, state in uploads:
            p = by_upload[id(state)]
            if weight > 0 and p.sealed is not None:
                kept.append(SealedUpload(p.name, round_, weight, p.sealed))
        if kept:  # nobody trained them (no token): they keep their value, as a module nobody holds does
            self.sealed = kept

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps (the blobs as base64; still sealed)."""
        return {"private_blocks": self.blocks, "sealed": [_to_json(s) for s in self.sealed]}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.sealed = [_from_json(item) for item in state.get("sealed", [])]

    def export(self, folder: Path, ranks: Mapping[str, int], seed: int) -> None:
        """``private.json`` beside the exported adapter: what a fleet-key holder needs to complete it."""
        if not self.blocks:
            return
        body = {
            "job": self.job, "private_blocks": self.blocks, "seed": seed,
            "ranks": {k: r for k, r in ranks.items() if block_of(k) < self.blocks},
            "sealed": [_to_json(s) for s in self.sealed],
        }  # fmt: skip
        (folder / PRIVATE_FILE).write_text(json.dumps(body, indent=1) + "\n")


def unseal_adapter(folder: Path, key: bytes, out: Path) -> Path:
    """The exported adapter in ``folder`` completed with its private blocks, averaged from the sealed uploads in
    its ``private.json`` with the fleet ``key``, written to ``out`` (a standard PEFT adapter folder)."""
    try:
        info = json.loads((folder / PRIVATE_FILE).read_text())
        sealed = [_from_json(item) for item in info["sealed"]]
        job, ranks, seed = str(info["job"]), {str(k): int(v) for k, v in info["ranks"].items()}, int(info["seed"])
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{folder} has no {PRIVATE_FILE}: it is not the adapter of a job with private adapters"
        ) from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{folder / PRIVATE_FILE} cannot be read: {exc}") from exc
    if not sealed:
        raise ConfigError(f"{folder / PRIVATE_FILE} holds no sealed upload: the job applied no round")
    try:
        merged = average_sealed(key, job, sealed, ranks, seed)
    except WireError as exc:
        raise ConfigError(f"cannot open the private adapters: {exc.detail}") from exc
    # (a blob left out is logged; with the devices' key every blob of a clean run opens)
    weights = load_file(folder / ADAPTER_FILE)
    unknown = sorted(set(merged) - set(weights))
    if unknown:
        raise ConfigError(f"the private adapters hold modules the exported adapter lacks: {unknown[:2]}")
    shutil.copytree(folder, out)
    (out / PRIVATE_FILE).unlink()
    complete = {**weights, **{n: t.contiguous() for n, t in merged.items()}}
    save_file(complete, out / ADAPTER_FILE, metadata={"format": "pt"})
    return out


def _to_json(s: SealedUpload) -> dict[str, Any]:
    return {"agent": s.agent, "round": s.round, "weight": s.weight, "blob": base64.b64encode(s.blob).decode()}


def _from_json(item: Mapping[str, Any]) -> SealedUpload:
    return SealedUpload(str(item["agent"]), int(item["round"]), float(item["weight"]), base64.b64decode(item["blob"]))
