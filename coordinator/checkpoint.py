"""Round checkpoints: the global adapters and the server's optimiser state, in safetensors + JSON.

``<out>/checkpoints/round-00003/`` holds ``adapter.safetensors`` (the global LoRA weights),
``optimizer.safetensors`` (every tensor of the optimiser state) and ``state.json`` (the round, the
block ranks, the optimiser's non-tensor state, the run's bookkeeping, and ``state_digest``: a
SHA-256 over every tensor's name, dtype, shape and bytes and the optimiser's scalars). A checkpoint
is written into a hidden temporary folder and renamed into place, so a crash never leaves a
half-written one; loading recomputes the digest from the restored model and optimiser and refuses a
checkpoint that does not reproduce it bit for bit.
Nothing is pickled: a checkpoint may come from elsewhere, and unpickling executes code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from splitft.coordinator.server import ServerModel
from splitft.shared.errors import ConfigError
from splitft.shared.model.lora import load_lora_state, lora_state

log = logging.getLogger(__name__)
KEEP = 3  # checkpoints kept; older ones are removed


def state_digest(server: ServerModel) -> str:
    """SHA-256 of the global adapters and the optimiser state, as they are in memory now."""
    tensors, scalars, groups = flatten_optimizer(server.optimizer.state_dict())
    return _digest(lora_state(server.segment.peft_model), tensors, scalars, groups)


def _digest(adapters: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], scalars: Any, groups: Any) -> str:
    h = hashlib.sha256()
    for prefix, named in (("adapter", adapters), ("optimizer", tensors)):
        for name in sorted(named):
            t = named[name].detach().cpu().contiguous()
            h.update(f"{prefix}:{name}:{t.dtype}:{list(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps([scalars, groups], sort_keys=True, default=repr).encode())
    return h.hexdigest()


def save_checkpoint(root: Path, round_: int, server: ServerModel, extra: dict[str, Any]) -> Path:
    """Write the checkpoint of a completed round; returns its folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{round_:05d}"
    tmp = root / f".round-{round_:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    adapters, tensors, scalars, groups = server_state(server)
    save_file(adapters, tmp / "adapter.safetensors")
    save_file(tensors, tmp / "optimizer.safetensors")
    state = {
        "round": round_,
        "ranks": {str(k): v for k, v in server.ranks.items()},
        "optimizer_scalars": scalars,
        "optimizer_groups": groups,
        "state_digest": state_digest(server),
        **extra,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(root.glob("round-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: Path) -> Path | None:
    done = sorted(p for p in root.glob("round-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def read_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"checkpoint {folder} is unreadable: {exc}") from exc
    if not isinstance(state, dict) or "round" not in state:
        raise ConfigError(f"checkpoint {folder} has no round")
    return state


def verify_checkpoint(folder: Path) -> str:
    """Check a checkpoint's files against its state digest, without a model (before anything connects);
    returns the digest. A ConfigError says the checkpoint is damaged."""
    state = read_state(folder)
    try:
        adapters = load_file(folder / "adapter.safetensors")
        tensors = load_file(folder / "optimizer.safetensors")
        digest = _digest(adapters, tensors, state["optimizer_scalars"], state["optimizer_groups"])
    except Exception as exc:  # a missing file or field, or safetensors' own error on a damaged header
        raise ConfigError(f"checkpoint {folder} is damaged: {type(exc).__name__}: {exc}") from exc
    if digest != state.get("state_digest"):
        raise ConfigError(
            f"checkpoint {folder} is damaged: its files do not reproduce its state digest (a flipped or lost "
            "byte); remove it to resume from the one before"
        )
    return digest


def load_checkpoint(folder: Path, server: ServerModel) -> dict[str, Any]:
    """Restore adapters and optimiser state into ``server``; returns ``state.json``."""
    state = read_state(folder)
    ranks = {int(k): v for k, v in state["ranks"].items()}
    if ranks != server.ranks:
        raise ConfigError(f"checkpoint {folder} has block ranks {ranks}, the server was built with {server.ranks}")
    adapters, tensors = load_file(folder / "adapter.safetensors"), load_file(folder / "optimizer.safetensors")
    load_server_state(server, adapters, tensors, state["optimizer_scalars"], state["optimizer_groups"])
    digest = state_digest(server)
    if "state_digest" in state and digest != state["state_digest"]:
        raise ConfigError(f"checkpoint {folder} does not reproduce its state digest: the files are damaged")
    log.info("restored %s: state digest %s verified", folder, digest)
    return {**state, "state_digest": digest}


def server_state(
    server: ServerModel,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any], list[dict[str, Any]]]:
    """The global adapters and the optimiser state as tensors and plain values (:func:`flatten_optimizer`),
    on the CPU: what a checkpoint holds, and what rank 0 sends its workers each round."""
    adapters = {n: t.detach().cpu().contiguous() for n, t in lora_state(server.segment.peft_model).items()}
    return adapters, *flatten_optimizer(server.optimizer.state_dict())


def load_server_state(
    server: ServerModel,
    adapters: dict[str, torch.Tensor],
    tensors: dict[str, torch.Tensor],
    scalars: dict[str, Any],
    groups: list[dict[str, Any]],
) -> None:
    """Put :func:`server_state`'s parts back into ``server``."""
    load_lora_state(server.segment.peft_model, {n: t.to(server.device) for n, t in adapters.items()})
    server.optimizer.load_state_dict(unflatten_optimizer(tensors, scalars, groups))


def flatten_optimizer(
    opt_state: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[dict[str, Any]]]:
    """An optimiser's state dict as (tensors by "<param index>.<key>", the other values so named, its groups):
    what safetensors and JSON can hold, for :func:`unflatten_optimizer` to put back together."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entry in opt_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, scalars, opt_state["param_groups"]


def unflatten_optimizer(
    tensors: dict[str, torch.Tensor], scalars: dict[str, Any], groups: list[dict[str, Any]]
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *scalars.items()]:
        index, _, key = flat.partition(".")
        state.setdefault(int(index), {})[key] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}
