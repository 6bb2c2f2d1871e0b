"""The bodies of the control messages: join (a device's profile), assign (its part in a round), status and
notice. Each kind has a ``*_body`` function that builds it and a ``parse_*`` that checks it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from splitft.shared.errors import ConfigError, Refusal, WireError
from splitft.shared.job.config import SPLITS, OptimizerSettings
from splitft.shared.job.data import check_chat_template
from splitft.shared.model.defense import DefenseSettings
from splitft.shared.model.lora import LoraSettings
from splitft.shared.model.memory import PROFILE_FIELDS
from splitft.shared.wire.codec import (
    FLOAT_WIRE_DTYPES,
    _brief,
)
from splitft.shared.wire.fields import get_field, int_field
from splitft.shared.wire.sealed import MAX_SEALED, SealedUpload

# --------------------------------------------------------------------------- small messages


#: profile fields the coordinator computes with (estimates, placement): numbers >= 0 when present
PROFILE_NUMBERS = frozenset(
    {"block_s", "block_tokens", "load_s", "usable_mb", "memory_available_mb", "memory_total_mb", "uplink_mbps",
     "downlink_mbps", "rtt_ms", "throughput_gflops", "accelerator_memory_mb", "cpu_logical", "cpu_physical",
     "cpu_max_mhz", "load_1m", "torch_threads"} | PROFILE_FIELDS
)  # fmt: skip


@dataclass(frozen=True)
class Join:
    """What an agent says when it joins: its device profile, the size of its data, the model it runs."""

    profile: dict[str, Any]  # a flat map of measured and declared device figures (see parse_join)
    data_samples: int
    data_tokens: int  # a rough count, for planning
    model: str  # as the agent was given it (a preset name or its own path): for the logs
    version: str = ""  # the agent's SplitFT version
    fingerprint: str = ""  # the model's content id (splitft.shared.model.loading.model_fingerprint): what is compared
    # examples of its data that fit the job's max_length (read from the coordinator's status); None: not known
    usable_samples: int | None = None


def join_body(join: Join) -> dict[str, Any]:
    return {
        "profile": dict(join.profile),
        "data_samples": join.data_samples,
        "data_tokens": join.data_tokens,
        "model": join.model,
        "version": join.version,
        "fingerprint": join.fingerprint,
        "usable_samples": join.usable_samples,
    }


def parse_join(body: Mapping[str, Any]) -> Join:
    """A join: the agent's device profile and the size of its data.

    The profile is a flat map of at most 64 names to scalars (strings of at most 256 characters,
    finite numbers, booleans, nil); the fields in :data:`PROFILE_NUMBERS` must be numbers >= 0.
    """
    profile = get_field(body, "profile", dict)
    samples = int_field(body, "data_samples", 1, 1 << 40)
    tokens = int_field(body, "data_tokens", 1, 1 << 48)
    model = get_field(body, "model", str)
    version = body.get("version", "")
    if not isinstance(version, str) or len(version) > 64:
        raise WireError(Refusal.BAD_SCHEMA, f"version must be a string of at most 64 characters, got {_brief(version)}")
    fingerprint = get_field(body, "fingerprint", str)
    if not 0 < len(fingerprint) <= 64:
        raise WireError(Refusal.BAD_SCHEMA, "fingerprint must be a string of 1 to 64 characters")
    usable = body.get("usable_samples")
    if usable is not None and (type(usable) is not int or not 0 <= usable <= samples):
        raise WireError(Refusal.BAD_SCHEMA, f"usable_samples must be nil or an integer in [0, {samples}]")
    if len(profile) > 64:
        raise WireError(Refusal.BAD_SCHEMA, "profile has too many fields")
    for name, value in profile.items():
        if not isinstance(name, str) or len(name) > 64:
            raise WireError(
                Refusal.BAD_SCHEMA, f"profile field name {_brief(name)} is not a string of at most 64 characters"
            )
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if name in PROFILE_NUMBERS and not (number and value >= 0):
            raise WireError(
                Refusal.BAD_SCHEMA, f"profile field {name!r} must be a finite number >= 0, got {_brief(value)}"
            )
        if not (number or value is None or isinstance(value, bool) or (isinstance(value, str) and len(value) <= 256)):
            raise WireError(Refusal.BAD_SCHEMA, f"profile field {name!r} must be a scalar, got {_brief(value)}")
    return Join(dict(profile), samples, tokens, model, version, fingerprint, usable)


@dataclass(frozen=True)
class Assignment:
    """A device's part in one round: its layout (cut, tail, LoRA ranks), the adapters it starts from and
    how to train. ``round`` and ``corr`` travel in the envelope, the rest in the body."""

    round: int
    model: str  # the coordinator's name for it (for the logs)
    fingerprint: str  # its content id: the agent checks it against its own model's
    cut: int
    ranks: dict[int, int]  # LoRA rank of every block the device holds
    lora: LoraSettings
    adapter: Any  # the encoded state, decoded once the segment's shapes are known
    local_steps: int
    batch_size: int
    max_length: int
    optimizer: OptimizerSettings
    wire_dtype: str
    adapter_wire_dtype: str
    step_timeout_s: float
    seed: int
    attempt: int = 1  # the coordinator's run of this round (a round that fell short of min_agents runs again)
    corr: str = ""  # the assignment's id, repeated in the activations and the upload
    split: str = "two-part"  # "u": the device also holds the last `tail` blocks and the head, and takes the loss
    tail: int = 0  # U split: blocks at the top of the model this device holds
    report_loss: bool = True  # U split: send the mean loss (a scalar) with each tail gradient
    # clip / noise on the activations sent, NoPeek in the loss
    defense: DefenseSettings = field(default_factory=DefenseSettings)
    chat_template: str | bool = "auto"  # how the device renders its pairs and conversations (shared/job/data.py)
    # Private adapters (shared/wire/sealed.py): blocks 0..private-1 are averaged by the devices; their ranks in the
    # job, and the last round's sealed uploads of them (none yet: ``adapter`` carries their initial values)
    private: int = 0
    private_ranks: tuple[int, ...] = ()
    sealed: tuple[SealedUpload, ...] = ()

    @property
    def u_split(self) -> bool:
        return self.split == "u"


def assign_body(a: Assignment) -> dict[str, Any]:
    """The body of an ``assign`` message (the adapter state already encoded)."""
    lora: dict[str, Any] = {
        "r": a.lora.r,
        "r_cut": a.lora.r_cut,
        "alpha_per_rank": a.lora.alpha_per_rank,
        "dropout": a.lora.dropout,
    }
    if a.lora.targets is not None:
        lora["targets"] = list(a.lora.targets)
    return {
        "model": a.model,
        "fingerprint": a.fingerprint,
        "cut": a.cut,
        "split": a.split,
        "tail": a.tail,
        "report_loss": a.report_loss,
        "ranks": [a.ranks[j] for j in sorted(a.ranks)],
        "lora": lora,
        "adapter": a.adapter,
        "local_steps": a.local_steps,
        "batch_size": a.batch_size,
        "max_length": a.max_length,
        "optimizer": {
            "name": a.optimizer.name,
            "lr": a.optimizer.lr,
            "weight_decay": a.optimizer.weight_decay,
            "momentum": a.optimizer.momentum,
        },
        "defense": {
            "noise": a.defense.noise,
            "clip": a.defense.clip,
            "nopeek": a.defense.nopeek,
            **({"distance": a.defense.distance} if a.defense.distance else {}),
        },
        "wire_dtype": a.wire_dtype,
        "adapter_wire_dtype": a.adapter_wire_dtype,
        "step_timeout_s": a.step_timeout_s,
        "seed": a.seed,
        "attempt": a.attempt,
        "chat_template": a.chat_template,
        **_private_fields(a),
    }


def _private_fields(a: Assignment) -> dict[str, Any]:
    if not a.private:
        return {}
    return {"private": a.private, "private_ranks": list(a.private_ranks), "sealed": [s.to_wire() for s in a.sealed]}


def _parse_private(body: Mapping[str, Any], cut: int) -> tuple[int, tuple[int, ...], tuple[SealedUpload, ...]]:
    private = body.get("private", 0)
    if type(private) is not int or not 0 <= private <= cut:
        raise WireError(Refusal.BAD_SCHEMA, f"private {_brief(private)} must be a block count within the cut {cut}")
    if not private:
        return 0, (), ()
    ranks, sealed = body.get("private_ranks"), body.get("sealed")
    if not (isinstance(ranks, list) and len(ranks) == private and all(type(r) is int and 0 < r <= 4096 for r in ranks)):
        raise WireError(Refusal.BAD_SCHEMA, "private_ranks must list one positive rank per private block")
    if not isinstance(sealed, list) or len(sealed) > MAX_SEALED:
        raise WireError(Refusal.BAD_SCHEMA, f"sealed must list at most {MAX_SEALED} sealed uploads")
    return private, tuple(ranks), tuple(SealedUpload.from_wire(item) for item in sealed)


def parse_assign(
    round_: int,
    body: Mapping[str, Any],
    fingerprint: str,
    total_layers: int,
    max_positions: int | None = None,
    corr: str | None = None,
) -> Assignment:
    """Check an assignment against this agent's model; a WireError says what is wrong."""

    def get(name: str, kind: type | tuple[type, ...]) -> Any:
        value = body.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise WireError(Refusal.BAD_SCHEMA, f"assignment field {name!r} missing or of the wrong type")
        return value

    model = get("model", str)
    if get("fingerprint", str) != fingerprint:
        raise WireError(
            Refusal.BAD_SCHEMA,
            f"assignment for model {_brief(model)} (fingerprint {_brief(body['fingerprint'])}), this agent's model "
            f"has fingerprint {fingerprint}",
        )
    cut = get("cut", int)
    if not 1 <= cut <= total_layers - 1:
        raise WireError(Refusal.BAD_SCHEMA, f"cut {cut} outside 1..{total_layers - 1}")
    split = body.get("split", "two-part")
    if split not in SPLITS:
        raise WireError(Refusal.BAD_SCHEMA, f"unknown split {split!r}")
    tail = body.get("tail", 0)
    if type(tail) is not int or not 0 <= tail <= total_layers - 1 - cut or (split == "two-part" and tail != 0):
        raise WireError(
            Refusal.BAD_SCHEMA, f"tail {tail!r} does not fit a {split} split at cut {cut} of {total_layers}"
        )
    report_loss = body.get("report_loss", True)
    if type(report_loss) is not bool:
        raise WireError(Refusal.BAD_SCHEMA, "report_loss must be a boolean")
    chat_template = body.get("chat_template", "auto")
    try:
        check_chat_template(chat_template)
    except ConfigError as exc:
        raise WireError(Refusal.BAD_SCHEMA, str(exc)) from exc
    blocks = [*range(cut), *range(total_layers - tail, total_layers)]
    ranks = get("ranks", list)
    if len(ranks) != len(blocks) or not all(type(r) is int and 0 < r <= 4096 for r in ranks):
        raise WireError(Refusal.BAD_SCHEMA, "ranks must list one positive rank per client block")
    wire, adapter_wire = get("wire_dtype", str), get("adapter_wire_dtype", str)
    if wire not in FLOAT_WIRE_DTYPES or adapter_wire not in FLOAT_WIRE_DTYPES:
        raise WireError(Refusal.BAD_DTYPE, f"unknown wire dtype {wire!r} / {adapter_wire!r}")
    try:
        lora_fields = dict(get("lora", dict))
        if "targets" in lora_fields and isinstance(lora_fields["targets"], list):
            lora_fields["targets"] = tuple(lora_fields["targets"])
        lora = LoraSettings(**lora_fields)
        optimizer = OptimizerSettings(**get("optimizer", dict))
        raw_defense = body.get("defense", {})
        if not isinstance(raw_defense, dict):
            raise ConfigError("defense must be a map")
        defense = DefenseSettings(**raw_defense)
    except (TypeError, ConfigError) as exc:
        raise WireError(Refusal.BAD_SCHEMA, f"assignment settings: {exc}") from exc
    steps, batch, length = get("local_steps", int), get("batch_size", int), get("max_length", int)
    if not (1 <= steps <= 100_000 and 1 <= batch <= 4096 and 8 <= length <= 1 << 20):
        raise WireError(Refusal.BAD_SCHEMA, "local_steps, batch_size or max_length out of range")
    if max_positions is not None and length > max_positions:
        raise WireError(Refusal.BAD_SCHEMA, f"max_length {length} exceeds the model's {max_positions} positions")
    timeout = float(get("step_timeout_s", (int, float)))
    if not 0 < timeout < 1e7:
        raise WireError(Refusal.BAD_SCHEMA, "step_timeout_s out of range")
    attempt = body.get("attempt", 1)
    if type(attempt) is not int or not 1 <= attempt <= 1_000_000:
        raise WireError(Refusal.BAD_SCHEMA, "attempt out of range")
    private, private_ranks, sealed = _parse_private(body, cut)
    return Assignment(
        round=round_,
        model=model,
        fingerprint=fingerprint,
        cut=cut,
        ranks=dict(zip(blocks, ranks, strict=True)),
        lora=lora,
        adapter=get("adapter", dict),
        local_steps=steps,
        batch_size=batch,
        max_length=length,
        optimizer=optimizer,
        wire_dtype=wire,
        adapter_wire_dtype=adapter_wire,
        step_timeout_s=timeout,
        seed=get("seed", int),
        attempt=attempt,
        split=split,
        tail=tail,
        report_loss=report_loss,
        defense=defense,
        corr=corr or "",
        chat_template=chat_template,
        private=private,
        private_ranks=private_ranks,
        sealed=sealed,
    )


def parse_status(body: Mapping[str, Any]) -> str:
    state = get_field(body, "state", str)
    if state not in ("online", "offline"):
        raise WireError(Refusal.BAD_SCHEMA, f"unknown status {_brief(state)}")
    return str(state)


#: what the job-wide ``round`` topic announces: a round starting (with its agents), the job done
ROUND_EVENTS = frozenset({"start", "done"})


def parse_round(body: Mapping[str, Any]) -> str:
    """A ``round`` message's event (``start``: ``agents`` lists the round's agents by name)."""
    event = get_field(body, "event", str)
    if event not in ROUND_EVENTS:
        raise WireError(Refusal.BAD_SCHEMA, f"unknown round event {_brief(event)}")
    if event == "start":
        agents = get_field(body, "agents", list)
        if len(agents) > 1 << 16 or not all(isinstance(a, str) and 0 < len(a) <= 256 for a in agents):
            raise WireError(Refusal.BAD_SCHEMA, "agents must list the round's agents by name")
    return str(event)


@dataclass(frozen=True)
class CoordinatorStatus:
    """The coordinator's retained status. Online, it gives the job's step shape, so that a joining agent can
    say how many of its examples fit and what memory a step needs, and bound what it will be sent."""

    state: str
    done: bool = False  # offline because the job is finished
    connection: int = 0  # the coordinator's broker connection this status was announced on (1, 2, ...)
    max_length: int = 0
    batch_size: int = 0
    lora_rank: int = 0  # the job's highest LoRA rank
    chat_template: str | bool = "auto"
    private_blocks: int = 0  # private adapters: the blocks devices average among themselves (0: off)


def parse_coordinator_status(body: Mapping[str, Any]) -> CoordinatorStatus:
    """Every field is checked: a status with one bad field is refused whole (an agent waits for a valid one)."""
    state = parse_status(body)
    done = body.get("done", False)
    if type(done) is not bool:
        raise WireError(Refusal.BAD_SCHEMA, f"done must be a boolean, got {_brief(done)}")
    if state == "offline":
        return CoordinatorStatus(state, done=done)
    template = body.get("chat_template")
    if template != "auto" and type(template) is not bool:
        raise WireError(Refusal.BAD_SCHEMA, f'chat_template must be "auto", true or false, got {_brief(template)}')
    return CoordinatorStatus(
        state,
        connection=int_field(body, "connection", 0, 1 << 40),
        max_length=int_field(body, "max_length", 1, 1 << 20),
        batch_size=int_field(body, "batch_size", 1, 1 << 16),
        lora_rank=int_field(body, "lora_rank", 1, 4096),
        chat_template=template,
        private_blocks=int_field(body, "private_blocks", 0, 4096) if "private_blocks" in body else 0,
    )


#: what the coordinator tells one agent: it was dropped from a round, or its upload was refused
#: dropped: out of the current round; refused: its upload was refused; not_admitted: its join was refused
NOTICE_EVENTS = frozenset({"dropped", "refused", "not_admitted"})
#: why a join was refused: the agent's model is another one, or its data has no usable example
NOTICE_CAUSES = frozenset({"model", "data", "memory"})


@dataclass(frozen=True)
class Notice:
    event: str
    reason: str
    cause: str | None = None  # not_admitted only


def notice_body(event: str, reason: str, cause: str | None = None) -> dict[str, Any]:
    if event not in NOTICE_EVENTS or (cause is not None and cause not in NOTICE_CAUSES):
        raise ValueError(f"unknown notice {event!r} ({cause!r})")
    body: dict[str, Any] = {"event": event, "reason": reason[:500]}
    if cause is not None:
        body["cause"] = cause
    return body


def parse_notice(body: Mapping[str, Any]) -> Notice:
    event = get_field(body, "event", str)
    if event not in NOTICE_EVENTS:
        raise WireError(Refusal.BAD_SCHEMA, f"unknown notice {_brief(event)}")
    cause = body.get("cause")
    if cause is not None and cause not in NOTICE_CAUSES:
        raise WireError(Refusal.BAD_SCHEMA, f"unknown notice cause {_brief(cause)}")
    return Notice(str(event), str(get_field(body, "reason", str))[:500], cause)
