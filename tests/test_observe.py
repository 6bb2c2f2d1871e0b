"""The coordinator's observers: the live dashboard in a real headless Chromium, /metrics parsed with
prometheus-client's parser, TensorBoard event files read back, and their flags' errors."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import assert_error
from typer.testing import CliRunner

from splitft.agent.runtime import Agent, AgentSettings
from splitft.bench.browser import chromium
from splitft.coordinator.cli import app
from splitft.coordinator.observe.dashboard import Address, Observatory
from splitft.coordinator.runtime import Coordinator
from splitft.shared.errors import ExitCode
from splitft.shared.job.config import JobConfig
from splitft.shared.job.data import write_shards
from splitft.shared.job.records import load_records
from splitft.shared.model.tokenizer import GSM8K
from splitft.shared.wire.broker import BrokerSettings

from conftest import Broker

ROUNDS = 4
# What the page shows, read in the browser: rows of the fleet table, points of the loss chart, the status.
READ_PAGE = """({
  rows: [...document.querySelectorAll('#fleet tbody tr')].map((r) => r.dataset.agent),
  points: document.querySelectorAll('#loss-chart circle.pt').length,
  cutPoints: document.querySelectorAll('#cut-chart circle.pt').length,
  bars: document.querySelectorAll('#bytes-chart rect.bar-bytes_up').length,
  parts: document.querySelectorAll('#fleet .bar span').length,
  status: document.body.dataset.status || '',
})"""


async def test_dashboard_in_a_browser_metrics_and_tensorboard(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="splitft.coordinator.membership")  # who joined and who left
    job = JobConfig(
        job="watch", model="tiny-gpt2", rounds=ROUNDS, local_steps=2, batch_size=2, max_length=48, cut=1,
        min_agents=2, eval_samples=4, policy="splitft",
    )  # fmt: skip
    pairs = load_records(GSM8K / "train.jsonl", limit=16)
    data = dict(zip(("a1", "a2"), write_shards(pairs, 2, tmp_path / "shards", seed=0), strict=True))
    out = tmp_path / "out"
    settings = BrokerSettings(url=broker.url)
    observatory = Observatory(job, dashboard=Address("127.0.0.1", 0), tensorboard=out / "tb")
    seen: list[dict] = []
    async with observatory:
        assert observatory.url is not None
        coordinator = asyncio.create_task(Coordinator(job, settings, out, progress=observatory).run())
        async with chromium() as page:
            await page.goto(observatory.url)
            await page.wait_for("document.body.dataset.status === 'waiting'")  # live before any agent came
            agents = [asyncio.create_task(Agent(AgentSettings(n, job.job, job.model, p), settings).run()) for n, p in data.items()]  # fmt: skip
            try:
                while not coordinator.done():
                    seen.append(await page.evaluate(READ_PAGE))
                    await asyncio.sleep(0.1)
                await coordinator
                await asyncio.wait_for(asyncio.gather(*agents), timeout=60)
                final = await page.wait_for(f"(() => {{ const p = {READ_PAGE}; return p.status === 'done' && p; }})()")
                await page.screenshot(out / "dashboard.png")  # kept in the run folder: CI's artefact
            finally:
                for task in agents:
                    task.cancel()
        async with aiohttp.ClientSession() as session, session.get(observatory.url + "metrics") as response:
            assert response.status == 200
            exposition = await response.text()

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # The page: every agent in the table, the loss chart gaining points as rounds finished, live.
    assert page.errors == []  # the page's script never failed
    assert final["rows"] == ["a1", "a2"]
    assert final["points"] == ROUNDS + 1 and final["bars"] == ROUNDS and final["cutPoints"] == 2 * ROUNDS
    assert final["parts"] == 2 * 5  # each row's step split into its five parts
    counts = [s["points"] for s in seen]
    assert counts == sorted(counts), counts
    assert len(set(counts) & set(range(1, ROUNDS + 1))) >= 2, counts  # seen between rounds, not only at the end
    assert (out / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # /metrics, parsed as Prometheus parses it.
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }
    assert samples[("splitft_rounds_completed_total", ())] == ROUNDS
    # The agents online as the coordinator last saw them: one that said goodbye (the job done) before the
    # coordinator stopped counts as offline.
    online: dict[str, bool] = {}
    for record in caplog.records:
        words = record.getMessage().split()
        if record.name == "splitft.coordinator.membership" and words[:1] == ["agent"] and len(words) > 2:
            online[words[1]] = {"joined": True, "went": False}.get(words[2], online.get(words[1], False))
    assert set(online) == {"a1", "a2"}
    assert samples[("splitft_agents_online", ())] == sum(online.values())
    assert samples[("splitft_eval_loss", ())] == metrics[-1]["eval_loss"]
    assert samples[("splitft_bytes_total", (("direction", "up"),))] == sum(m["bytes_up"] for m in metrics[1:])
    for name in ("a1", "a2"):
        for part in ("total", "compute", "server", "network"):
            assert samples[("splitft_step_seconds_count", (("agent", name), ("part", part)))] == ROUNDS
        assert samples[("splitft_agent_cut", (("agent", name),))] == metrics[-1]["cuts"][name]

    # TensorBoard's own reader sees every round.
    (run,) = (out / "tb").iterdir()  # one run per job: tb/<job>-<date>-<time>
    assert run.name.startswith("watch-")
    events = EventAccumulator(str(run))
    events.Reload()
    losses = [(e.step, round(e.value, 4)) for e in events.Scalars("eval/loss")]
    assert losses == [(m["round"], round(m["eval_loss"], 4)) for m in metrics]
    assert [e.value for e in events.Scalars("cut/a1")] == [m["cuts"]["a1"] for m in metrics[1:]]


async def test_dashboard_token() -> None:
    observatory = Observatory(JobConfig(job="guarded"), dashboard=Address("127.0.0.1", 0), token="s3cret")
    async with observatory, aiohttp.ClientSession() as session:
        assert observatory.url is not None and observatory.url.endswith("?token=s3cret")
        base = observatory.url.split("?")[0]
        for path in ("", "metrics", "api/state", "events"):
            async with session.get(base + path) as response:
                assert response.status == 401, path
        async with session.get(base + "api/state?token=wrong") as response:
            assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
        async with session.get(base + "static/dashboard.js") as response:  # the package's files: no data
            assert response.status == 200
        async with session.get(base + "api/state?token=s3cret") as response:
            assert (await response.json())["job"]["name"] == "guarded"
        async with session.get(base + "metrics", headers={"Authorization": "bearer s3cret"}) as response:
            assert response.status == 200 and "splitft_job_info" in await response.text()


def test_bad_observer_flags_fail_before_the_job(tmp_path: Path) -> None:
    """A taken port, an unwritable TensorBoard folder, a malformed address: one clear error, nothing written,
    not even the TensorBoard folder checked first (the broker named is never reached: nothing listens there)."""
    runner = CliRunner()
    out = tmp_path / "run"
    base = [
        "run",
        "--broker",
        "mqtt://127.0.0.1:9",
        "--out",
        str(out),
        "--model",
        "tiny-gpt2",
        "--connect-timeout",
        "2",
    ]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, [*base, "--dashboard", f"127.0.0.1:{port}", "--tensorboard", str(out / "tb")])
        assert_error(result, ExitCode.CONFIG, "--dashboard", port, "cannot listen")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = runner.invoke(app, [*base, "--tensorboard", str(blocker / "tb")])
    assert_error(result, ExitCode.CONFIG, "--tensorboard", "cannot write")
    result = runner.invoke(app, [*base, "--dashboard", "localhost:http"])
    assert_error(result, ExitCode.CONFIG, "--dashboard", "[HOST:]PORT")
    assert not out.exists()
