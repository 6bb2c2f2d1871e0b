"""The coordinator's ``local`` command: one command, one machine (broker, coordinator and agent processes), and
the job it runs without a job file."""

from __future__ import annotations

import asyncio
import math
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any

import typer

from splitft.coordinator import answers
from splitft.coordinator.cli_jobs import (
    ConfigOpt,
    DashboardTokenOpt,
    DeviceOpt,
    OutOpt,
    TensorBoardOpt,
    build_observatory,
    observed,
    preflight,
)
from splitft.coordinator.cli_model import chat_template_flag, report_comparison
from splitft.coordinator.cli_support import check_data_file, fail, new_console, new_folders, remove_empty
from splitft.shared.errors import ConfigError, ExitCode, SplitFTError
from splitft.shared.job.config import JobConfig, torch_device
from splitft.tools.audit.table import job_privacy

#: what `local` runs without a job file: a short demo that visibly learns (the job file's defaults are for `run`)
LOCAL_DEFAULTS: dict[str, Any] = {
    "job": "local", "rounds": 6, "local_steps": 4, "batch_size": 4, "max_length": 192, "policy": "splitft",
    "lr": 2e-3, "split": "u", "plan_first_round": False,  # --cuts are round 1's cuts
}  # fmt: skip


def local_job(config: Path | None, **flags: Any) -> JobConfig:
    """The job `local` runs: the flags given win, then the job file; without a file, :data:`LOCAL_DEFAULTS`."""
    if config is None:
        flags = {k: LOCAL_DEFAULTS[k] if flags.get(k) is None and k in LOCAL_DEFAULTS else v for k, v in flags.items()}
        flags["job"] = LOCAL_DEFAULTS["job"]
    base = JobConfig.from_toml(config) if config is not None else JobConfig()
    lr = flags.pop("lr", None)
    if lr is not None:
        flags["optimizer"] = replace(base.optimizer, lr=lr)
    return base.with_overrides(**flags)


def local(
    out: OutOpt = Path("runs/local"),
    config: ConfigOpt = None,
    model: Annotated[
        str | None, typer.Option(help="Preset, Hugging Face model folder or .gguf file [default: tiny-gpt2].")
    ] = None,
    agents: Annotated[int, typer.Option(help="Agent processes to start.")] = 3,
    cuts: Annotated[
        str, typer.Option(help="First-round cut layers, given to the agents in turn (without --config: every policy).")
    ] = "1,2,3",
    rounds: Annotated[int | None, typer.Option(help="Rounds [default: 6, or the job file's].")] = None,
    local_steps: Annotated[
        int | None, typer.Option(help="Steps per agent per round [default: 4, or the job file's].")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Sequences per step per agent [default: 4, or the job file's].")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option(help="Tokens per sequence, at most [default: 192, or the job file's].")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate [default: 2e-3 (AdamW), or the job file's].")] = None,
    samples_per_agent: Annotated[int, typer.Option(help="Training samples per agent.")] = 96,
    alpha: Annotated[
        float, typer.Option(help="Length-based Dirichlet partition of the data (0.1 very skewed; 0 = IID split).")
    ] = 1.0,
    data: Annotated[
        Path | None,
        typer.Option(help="JSONL/CSV/Parquet of text, prompt/completion or messages to shard (default: GSM8K)."),
    ] = None,
    prompt_field: Annotated[
        str | None, typer.Option(help="--data's prompt field (default: prompt, question or instruction).")
    ] = None,
    response_field: Annotated[
        str | None, typer.Option(help="--data's response field (default: response, answer or output).")
    ] = None,
    eval_data: Annotated[
        Path | None,
        typer.Option(help="JSONL/CSV evaluated after every round [default: the job file's, or GSM8K test]."),
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option(help="Cut policy: fixed, paper, latency, splitft [default: splitft, or the job file's]."),
    ] = None,
    split: Annotated[
        str | None,
        typer.Option(
            help="u (default unless --config says otherwise): the agents also hold the last --tail blocks and the "
            "head, so no token or label leaves them; two-part: the coordinator computes the loss (it gets the labels)."
        ),
    ] = None,
    tail: Annotated[int | None, typer.Option(help="U split: blocks at the top of the model each agent holds.")] = None,
    emulate: Annotated[
        str, typer.Option(help="Device profiles the agents emulate, in turn ('' for none).")
    ] = "jetson-nano,jetson-orin-nano,laptop",
    emulate_scale: Annotated[
        float,
        typer.Option(
            help="Scale the emulated devices' compute (0.01 makes a tiny model's devices as slow as real ones)."
        ),
    ] = 1.0,
    base_dtype: Annotated[
        str | None,
        typer.Option(help="The server's frozen weights: fp32, bf16, fp16 [default: the job file's, or fp32]."),
    ] = None,
    device_dtype: Annotated[
        str | None,
        typer.Option(help="Every agent's frozen weights: fp32, bf16, fp16 [default: each emulated profile's dtype]."),
    ] = None,
    broker: Annotated[str | None, typer.Option(help="Use this broker instead of the embedded one.")] = None,
    mqtt_protocol: Annotated[str, typer.Option(help="MQTT version of --broker: 5, or 3.1.1.")] = "5",
    device: DeviceOpt = "auto",
    dashboard: Annotated[
        str,
        typer.Option(
            help="Serve the live dashboard and /metrics on [HOST:]PORT (HOST: 127.0.0.1), or off "
            "[default: 127.0.0.1:8765, or a free port if that one is taken]."
        ),
    ] = "",
    dashboard_token: DashboardTokenOpt = None,
    tensorboard: TensorBoardOpt = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Coordinator workers sharing the server segment, as processes here.")
    ] = 1,
    chat_template: Annotated[
        str | None,
        typer.Option(
            help="Pairs and messages through the tokenizer's chat template: auto, true, false [default: auto]."
        ),
    ] = None,
    compare: Annotated[
        int,
        typer.Option(
            min=0, help="At the end, answer the first N eval problems with the base model and the adapter (0: skip)."
        ),
    ] = 16,
    compare_tokens: Annotated[int, typer.Option(min=1, help="Tokens each of those answers may have.")] = 256,
) -> None:
    """One command, one machine: broker, coordinator and several agents with different cut layers
    fine-tune a model on GSM8K shards; ends with the adapter folder, metrics.jsonl and run.png."""
    from splitft.coordinator.local import LocalRun, run_local
    from splitft.shared.job.records import load_records
    from splitft.shared.model.precision import torch_dtype
    from splitft.shared.model.tokenizer import GSM8K
    from splitft.shared.profiles import load_profile
    from splitft.shared.wire.broker import BrokerSettings

    console = new_console()
    try:
        spec = local_job(
            config, model=model, rounds=rounds, local_steps=local_steps, batch_size=batch_size,
            max_length=max_length, policy=policy, lr=lr, split=split, tail=tail,
            eval_data=None if eval_data is None else str(eval_data), plan_first_round=None,
            chat_template=None if chat_template is None else chat_template_flag(chat_template), base_dtype=base_dtype,
        )  # fmt: skip
        if device_dtype is not None:
            torch_dtype(device_dtype, "--device-dtype")
        try:
            cut_list = tuple(int(c) for c in cuts.split(",") if c.strip())
        except ValueError:
            raise ConfigError(f"--cuts must be cut layers separated by commas, e.g. 1,2,3; got {cuts!r}") from None
        profiles = tuple(p.strip() for p in emulate.split(",") if p.strip())
        for name in profiles:
            try:
                load_profile(name)  # an unknown profile fails here, not in every agent process
            except ConfigError as exc:
                raise ConfigError(f"--emulate: {exc}") from exc
        if not (math.isfinite(emulate_scale) and emulate_scale > 0):
            raise ConfigError(f"--emulate-scale must be a positive number, got {emulate_scale}")
        if broker is not None:
            BrokerSettings(url=broker, protocol=mqtt_protocol)
        if (prompt_field is None) != (response_field is None):
            raise ConfigError("--prompt-field and --response-field must be given together")
        if data is not None:
            check_data_file(data)
            load_records(data, prompt_field, response_field, limit=1)
        elif prompt_field is not None:
            raise ConfigError("--prompt-field and --response-field name the fields of --data, which is not given")
        local_run = LocalRun(
            spec, out, agents=agents, cuts=cut_list, samples_per_agent=samples_per_agent, data=data, alpha=alpha or None,
            prompt_field=prompt_field, response_field=response_field,
            broker_url=broker, mqtt_protocol=mqtt_protocol, device=torch_device(device),
            emulate=profiles, emulate_scale=emulate_scale, workers=workers, device_dtype=device_dtype,
        )  # fmt: skip
        preflight(spec, out, cut_list)
        from splitft.coordinator.observe.dashboard import LOCAL_DEFAULT

        observatory = build_observatory(
            spec, console, dashboard or LOCAL_DEFAULT, dashboard_token, tensorboard, default=not dashboard
        )
    except SplitFTError as exc:
        raise fail(exc) from exc
    layout = f"U split, tail {spec.tail}" if spec.u_split else "two-part split"
    console.print(
        f"[bold]SplitFT local run[/bold]: {agents} agents (cuts {', '.join(map(str, cut_list))}; {layout}), "
        f"model {spec.model}, {spec.rounds} rounds x {spec.local_steps} steps; output in {out}"
    )
    console.print(job_privacy(spec, cut_list), highlight=False)
    made = new_folders(out)
    try:
        summary = asyncio.run(observed(observatory, console, lambda: run_local(local_run, progress=observatory)))
    except SplitFTError as exc:
        remove_empty(made)
        raise fail(exc) from exc
    except KeyboardInterrupt:
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    console.print(f"adapter: {summary['adapter']}\nmetrics: {summary['metrics']}\nplot:    {summary['plot']}")
    if compare:
        try:
            with console.status(f"answering {compare} held-out problems with the base model and with the adapter ..."):
                comparison = answers.compare(
                    spec.model, Path(summary["adapter"]), Path(spec.eval_data or GSM8K / "test.jsonl"), compare,
                    chat_template=spec.chat_template, max_new_tokens=compare_tokens, device=local_run.device,
                )  # fmt: skip
            report_comparison(console, comparison, Path(summary["metrics"]), out)
        except SplitFTError as exc:
            raise fail(exc) from exc
