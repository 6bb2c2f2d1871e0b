"""The end of a round: adapter uploads checked as they arrive, collected until every agent still in the
round sent one (or its deadline passed), and screened before they are aggregated."""

from __future__ import annotations

import logging
import math
import time

import torch

from splitft.coordinator.session import Participant, wait_briefly
from splitft.coordinator.steps import StepExchange
from splitft.shared.errors import Refusal, WireError
from splitft.shared.wire.link import Received
from splitft.shared.wire.messages import parse_adapter

log = logging.getLogger(__name__)


class Uploads(StepExchange):
    """Collect and screen the agents' adapter uploads."""

    def _adapter_arrived(self, received: Received) -> None:
        """Check an upload as it arrives: the first valid one of the current assignment is kept, nothing else."""
        env, name = received.envelope, received.envelope.sender
        plan = self._plans.get(name)
        if plan is None or plan.dropped is not None or env.round != self._round_now or env.corr != plan.corr:
            self._count_rejection(Refusal.UNEXPECTED, name, f"an adapter upload of no current assignment ({env.corr})")
            return
        if plan.upload is not None:
            return  # a repeat (re-sent after a reconnect)
        try:
            upload = parse_adapter(env.body, plan.expect)
        except WireError as exc:
            self._count_rejection(exc.reason, name, exc.detail)
            # Authenticated, a NaN/Inf upload is the agent's own diverged update: refuse it and tell it.
            # Unauthenticated it may be a forgery: wait for the agent's real upload.
            if exc.reason == Refusal.NONFINITE and self.broker.auth_key is not None:
                self._drop(plan, f"upload refused: {exc.detail}", event="refused")
                self._upload_arrived.set()
            return
        plan.bytes_up += received.size
        plan.timings = upload.timings
        plan.upload = upload.state
        self._upload_arrived.set()

    async def _collect_uploads(self, round_: int, plans: dict[str, Participant]) -> dict[str, dict[str, torch.Tensor]]:
        """Wait for every agent still in the round to upload (checked on arrival by :meth:`_adapter_arrived`)."""
        deadline = time.monotonic() + self.job.upload_timeout_s
        while True:
            while not self._events.empty():  # activations repeated after a reconnect still get their gradient
                item = self._events.get_nowait()
                if isinstance(item, Received) and not self._is_repeat(item, plans, round_):
                    detail = f"{item.topic.kind} of step {item.envelope.step} after the round's last step"
                    self._count_rejection(Refusal.UNEXPECTED, item.envelope.sender, detail)
            for name, plan in plans.items():
                if plan.dropped is None and plan.upload is None and self._gone(name):
                    self._drop(plan, "went offline before uploading", notify=False)
            remaining = deadline - time.monotonic()
            for plan in plans.values():
                if plan.dropped is None and plan.upload is None and remaining <= 0:
                    self._drop(plan, f"no adapter upload within {self.job.upload_timeout_s:g} s")
            if all(p.dropped is not None or p.upload is not None for p in plans.values()):
                return {n: p.upload for n, p in plans.items() if p.dropped is None and p.upload is not None}
            await wait_briefly(self._upload_arrived, remaining)

    def _screen_uploads(
        self, uploads: dict[str, dict[str, torch.Tensor]], plans: dict[str, Participant]
    ) -> list[tuple[float, dict[str, torch.Tensor]]]:
        """Refuse updates far larger than the round's median (a diverged or poisoned device); weight the
        rest by the tokens the server counted for each agent, not by what the agent claims."""
        for name, state in uploads.items():
            plan = plans[name]
            plan.update_norm = math.sqrt(sum(float((state[k] - plan.sent[k]).double().pow(2).sum()) for k in state))
        ratio = self.job.max_update_ratio
        norms = sorted(plans[n].update_norm for n in uploads)
        median = norms[len(norms) // 2] if norms else 0.0
        kept: list[tuple[float, dict[str, torch.Tensor]]] = []
        for name, state in uploads.items():
            plan = plans[name]
            if plan.dropped is not None:
                continue
            if ratio > 0 and len(uploads) >= 3 and median > 0 and plan.update_norm > ratio * median:
                reason = f"upload refused: update norm {plan.update_norm:.3g} > {ratio:g} x the median {median:.3g}"
                self._drop(plan, reason, event="refused")
                continue
            kept.append((float(plan.tokens), state))
        return kept
