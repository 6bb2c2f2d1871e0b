"""The chaos soak, its 3-minute variant (``python scripts/chaos.py --minutes 3``): a real Mosquitto, the coordinator
and three agents each in its own process, killed with SIGKILL and started again (the coordinator with --resume),
the broker restarted on its port, garbage and forged uploads on the job's topics, keyed and unkeyed jobs. Every job
must finish with an adapter equal bit for bit to the uninterrupted reference run's, and every refusal the members
had to make of what the driver sent while they listened must be counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from splitft.bench.chaos import FAULT_KINDS, ChaosSettings, run_soak


@pytest.mark.timeout(600)
def test_three_minute_chaos_soak_changes_no_adapter_and_counts_every_refusal(tmp_path: Path) -> None:
    summary = run_soak(ChaosSettings(out=tmp_path / "chaos", minutes=3, seed=0))
    jobs = summary["jobs"]
    verdicts = "\n".join(f"{j['job']}: {j['verdict']}" for j in jobs)
    assert summary["reference"]["finished"], summary["reference"]
    assert len(jobs) >= 2 and {j["keyed"] for j in jobs} == {False, True}, verdicts

    # Every job finished, its fleet came back from every fault, and its adapter is the reference's, bit for bit.
    assert all(j["finished"] for j in jobs), verdicts
    assert all(j["survived"] for j in jobs), verdicts
    assert all(j["adapter_equal"] for j in jobs), verdicts
    assert any(int(a) > 1 for j in jobs for a in j["attempts"].values()), "no round was ever run again"

    # At least one fault of each kind: process kills, broker restarts, garbage, each forgery.
    faults = summary["faults_by_kind"]
    assert all(faults[kind] >= 1 for kind in FAULT_KINDS), faults

    # Refusals were counted: in metrics.jsonl, and by every member for what it was sent while it listened.
    for j in jobs:
        assert sum(j["rejected_last_line"].values()) > 0, j["job"]
        assert not j["metrics_not_in_log"], (j["job"], j["metrics_not_in_log"])  # metrics.jsonl's counts are logged
        accounting = j["accounting"]
        for role, a in accounting.items():
            assert not a["uncounted"] and a["short"] == 0, (j["job"], role, a)
        assert not j["forgeries"]["uncounted"], (j["job"], j["forgeries"])
        if j["keyed"]:
            assert j["rejected_last_line"].get("unauthenticated", 0) > 0, j["rejected_last_line"]
            assert j["refusals_logged"]["coordinator"].get("bad_auth", 0) > 0, j["refusals_logged"]
        else:  # without a key, a forged upload is counted and the agent's own awaited: never a veto
            assert not any("vetoed" in f["outcome"] for f in j["forgeries"]["list"]), j["forgeries"]
    # Every member heard garbage while it listened, in some job (a job whose faults fell close together may leave a
    # member no quiet window of its own: its rounds take about a second each).
    for role in jobs[0]["accounting"]:
        assert sum(j["accounting"][role]["while_listening"] for j in jobs) > 0, role
    unkeyed = [j for j in jobs if not j["keyed"]]
    assert sum(j["refusals_logged"]["coordinator"].get("nonfinite", 0) for j in unkeyed) > 0
    assert summary["ok"], verdicts
    assert all(mib > 0 for mib in summary["peak_rss_mb"].values()) and len(summary["peak_rss_mb"]) == 4
