"""An agent's side of private adapters (shared/wire/sealed.py): the private blocks' adapters it starts a round
from, averaged here from the last round's sealed uploads, and its own sealed upload of them."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from splitft.shared.errors import ConfigError
from splitft.shared.model.aggregation import convert_state, module_key
from splitft.shared.model.lora import block_of
from splitft.shared.wire.codec import decode_state, encode_state
from splitft.shared.wire.control import Assignment
from splitft.shared.wire.sealed import associated, average_sealed, seal


def received_adapters(
    a: Assignment, shapes: Mapping[str, tuple[int, ...]], fleet_key: bytes | None, job: str
) -> dict[str, torch.Tensor]:
    """The adapters of every block the segment holds (``shapes``): the assignment's, and with private adapters
    after the first round, the private blocks' averaged here from the sealed uploads, as the coordinator would
    have averaged and sent them (the same aggregation, then the adapter wire dtype's rounding)."""
    if not a.private or not a.sealed:  # no private adapters, or their initial values (public) in the assignment
        return decode_state(a.adapter, expect={n: list(s) for n, s in shapes.items()})
    if fleet_key is None:
        raise ConfigError("this job's client adapters are private: join with --fleet-key-file")
    private = {n for n in shapes if block_of(n) < a.private}
    state = decode_state(a.adapter, expect={n: list(s) for n, s in shapes.items() if n not in private})
    job_ranks = {module_key(n): a.private_ranks[block_of(n)] for n in private}
    mine = {module_key(n): a.ranks[block_of(n)] for n in private}
    averaged = convert_state(average_sealed(fleet_key, job, a.sealed, job_ranks, a.seed), mine, seed=a.seed)
    state.update(decode_state(encode_state(averaged, a.adapter_wire_dtype)))
    return state


def split_upload(
    a: Assignment, state: Mapping[str, torch.Tensor], fleet_key: bytes | None, job: str, agent: str
) -> tuple[dict[str, torch.Tensor], bytes | None]:
    """(the adapters uploaded in clear, the private blocks' sealed with the fleet key, or None without them)."""
    if not a.private:
        return dict(state), None
    if fleet_key is None:
        raise ConfigError("this job's client adapters are private: join with --fleet-key-file")
    private = {n: t for n, t in state.items() if block_of(n) < a.private}
    clear = {n: t for n, t in state.items() if n not in private}
    return clear, seal(fleet_key, private, associated(job, a.round, agent), a.adapter_wire_dtype)
