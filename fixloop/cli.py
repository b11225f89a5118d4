"""The ``fixloop`` command (composition root): parse arguments, load settings, run a part.

``fixloop up`` runs the whole local stack; ``fixloop gateway``, ``fixloop diagnostics``,
``fixloop notifier``, ``fixloop dashboard`` and ``fixloop sim`` run one part against
external servers (``fixloop ops-users`` manages the dashboard's users);
``fixloop train`` learns the health models from stored history, ``fixloop detect``
scores a CSV time series and ``fixloop ttf`` predicts remaining life from CSV histories.
Settings come from ``--config`` (or ``./fixloop.toml``) and ``FIXLOOP_`` variables; a
wrong one ends the command with a one-line error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from diagnostics.settings import DiagnosticsSettings
from fixloop.config import in_data_dir, load_settings
from fixloop.dynsec_cli import add_credentials_parser, run_credentials
from fixloop.opsusers import add_parser as add_ops_users_parser
from fixloop.opsusers import ops_users_file
from fixloop.opsusers import run as run_ops_users
from fixloop.registry_cli import add_device_parsers, add_parsers, add_product_parsers, handles
from fixloop.registry_cli import run as run_registry
from fixloop.settings import Settings
from wire.errors import ConfigError, FixloopError

__all__ = ["main"]

_LOG = logging.getLogger("fixloop")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 (got {text})")
    return value


def _speed(text: str) -> str:
    if text == "max":
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"must be simulated seconds per real second above 0 (like 60), or 'max' (got {text})"
        )
    return text


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0 (got {text})")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fixloop",
        description="Connected products that look after themselves: telemetry, health, fixes.",
    )
    parser.add_argument("--config", type=Path, help="TOML settings file (default ./fixloop.toml)")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up", help="start a local broker, InfluxDB, the gateway and a simulated fleet"
    )
    up.add_argument("--devices", type=_count, help="simulated devices (default from settings)")
    up.add_argument("--speed", type=_speed, help="simulated seconds per real second, or 'max'")
    up.add_argument("--data-dir", type=Path, help="where the stack keeps its data")
    up.add_argument(
        "--for",
        dest="run_for_s",
        type=_positive_seconds,
        help="stop after this many seconds (default: Ctrl-C)",
    )

    gateway = commands.add_parser(
        "gateway", help="run the gateway against the configured broker and InfluxDB"
    )
    gateway.add_argument(
        "--retire",
        action="store_true",
        help="take this instance (gateway.instance, stopped) out of its shared group: "
        "store what the broker holds for it, replay its spool, end its session",
    )

    commands.add_parser(
        "diagnostics",
        help="score the fleet and publish diagnoses (models from `fixloop train`, if any)",
    )
    commands.add_parser(
        "notifier",
        help="run the owner loop: cases, remote fixes, appointments, push, owner API",
    )
    commands.add_parser(
        "dashboard",
        help="serve the ops dashboard: the case store, InfluxDB and live fleet/cases",
    )
    add_ops_users_parser(commands)
    devices = commands.add_parser(
        "devices", help="devices: register, import, list, retire; their broker accounts"
    )
    device_actions = devices.add_subparsers(dest="devices_command", required=True, metavar="ACTION")
    add_credentials_parser(device_actions)
    add_device_parsers(device_actions)
    add_parsers(commands)
    train = commands.add_parser(
        "train", help="learn the fleet health models from the history in InfluxDB"
    )
    train.add_argument("--days", type=float, help="history to learn from (default 7)")
    train.add_argument(
        "--data-dir",
        type=Path,
        help="the data folder whose case store and models to use (stack.data_dir), unless "
        "[notifier] db_path or [diagnostics] model_path is set",
    )

    products = commands.add_parser("products", help="product files: describe a product model")
    product_commands = products.add_subparsers(dest="products_command", required=True)
    check = product_commands.add_parser(
        "check", help="validate product files (each problem with its line, key and why)"
    )
    check.add_argument("files", type=Path, nargs="+", metavar="FILE", help="a product file")
    add_product_parsers(product_commands)

    sim = commands.add_parser("sim", help="run a simulated fleet against the configured broker")
    sim.add_argument("--devices", type=_count, help="number of devices")
    sim.add_argument("--speed", type=_speed, help="simulated seconds per real second, or 'max'")
    sim.add_argument(
        "--duration", type=_positive_seconds, help="simulated seconds to run (default: forever)"
    )
    sim.add_argument("--ground-truth", type=Path, help="write the injected faults to this CSV")

    detect = commands.add_parser(
        "detect", help="score each row of a CSV time series for anomalies (0-1)"
    )
    detect.add_argument("input", type=Path, help="CSV file (',' or ';' separated)")
    detect.add_argument("-o", "--output", type=Path, help="write here (default: stdout)")
    detect.add_argument("--timestamp-column", help="column holding time (default: guessed)")
    detect.add_argument("--separator", choices=[",", ";"], help="default: guessed")
    detect.add_argument(
        "--warmup-rows",
        type=int,
        default=None,
        help="rows learnt before an alert may be raised (default 20; scores from the start)",
    )
    detect.add_argument(
        "--progress", action="store_true", help="report progress on stderr even into a pipe"
    )

    ttf = commands.add_parser(
        "ttf",
        help="predict the remaining life of running units from run-to-failure histories",
    )
    ttf.add_argument(
        "--history",
        type=Path,
        required=True,
        metavar="HIST.csv",
        help="CSV of complete histories (each unit's last row is its failure)",
    )
    ttf.add_argument(
        "--input",
        type=Path,
        required=True,
        metavar="IN.csv",
        help="CSV of running units' rows so far",
    )
    ttf.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="OUT.csv",
        help="write unit,remaining,low,high here (default: stdout)",
    )
    ttf.add_argument(
        "--unit-column", default="unit", metavar="NAME", help="column naming the unit (unit)"
    )
    ttf.add_argument(
        "--time-column", default="time", metavar="NAME", help="column holding time (time)"
    )
    ttf.add_argument(
        "--cap",
        type=float,
        metavar="T",
        help="learn remaining times above T as T (default: no cap)",
    )
    ttf.add_argument(
        "--coverage",
        type=float,
        default=0.8,
        metavar="SHARE",
        help="share of outcomes the band holds (0.8)",
    )
    ttf.add_argument(
        "--progress", action="store_true", help="report progress on stderr even into a pipe"
    )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, str]:
    """Turn command-line flags into ``FIXLOOP_`` variables (flags beat the environment)."""
    env: dict[str, str] = {}
    if getattr(args, "devices", None) is not None:
        env["FIXLOOP_SIM__DEVICES"] = str(args.devices)
    if getattr(args, "speed", None) is not None:
        env["FIXLOOP_SIM__SPEED"] = str(args.speed)
    if getattr(args, "duration", None) is not None:
        env["FIXLOOP_SIM__DURATION_S"] = str(args.duration)
    if getattr(args, "days", None) is not None:
        env["FIXLOOP_DIAGNOSTICS__TRAIN_DAYS"] = str(args.days)
    if getattr(args, "data_dir", None) is not None:
        env["FIXLOOP_STACK__DATA_DIR"] = str(args.data_dir)
    return env


async def _until_signalled(
    work: Callable[[asyncio.Event], Awaitable[None]], run_for_s: float | None = None
) -> None:
    """Run ``work(stop)``; SIGINT/SIGTERM (or ``run_for_s``) set ``stop``."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if run_for_s is not None:
        loop.call_later(run_for_s, stop.set)
    try:
        await work(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run_until_stop(coro: Coroutine[Any, Any, None], stop: asyncio.Event) -> None:
    """Run ``coro`` until it ends or ``stop`` is set (then cancel it)."""
    async with asyncio.TaskGroup() as group:
        task = group.create_task(coro)
        waiter = group.create_task(stop.wait())
        done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            task.cancel()
        waiter.cancel()


async def _gateway(settings: Settings, stop: asyncio.Event, *, retire: bool = False) -> None:
    from gateway.service import Gateway

    if retire and not (settings.gateway.shared_group and settings.gateway.instance):
        raise ConfigError("gateway --retire needs gateway.shared_group and gateway.instance")
    async with Gateway(settings.mqtt, settings.influx, settings.gateway) as gateway:
        if retire:
            await _run_until_stop(gateway.retire(), stop)
            return
        _LOG.info(
            "gateway running: broker %s:%d, InfluxDB %s, metrics http://%s:%s/metrics",
            settings.mqtt.host,
            settings.mqtt.port,
            settings.influx.url,
            settings.gateway.metrics_host,
            gateway.metrics_port,
        )
        await _run_until_stop(gateway.run(), stop)


async def _sim(settings: Settings, stop: asyncio.Event, ground_truth: Path | None) -> None:
    from device_sim import run_fleet

    report = await run_fleet(settings.sim, stop=stop)
    _LOG.info("fleet stopped: %s", report.summary())
    if ground_truth is not None:
        report.write_ground_truth(ground_truth)
        _LOG.info("ground truth written to %s", ground_truth)


def _detect(args: argparse.Namespace) -> None:
    from diagnostics.csvdetect import detect_csv

    # Progress goes to a terminal, or anywhere when asked; never by default into a pipe.
    to_stdout = args.output is None
    shown = args.progress or (sys.stderr.isatty() and (not to_stdout or sys.stdout.isatty()))
    summary = detect_csv(
        args.input,
        sys.stdout if to_stdout else args.output,
        timestamp_column=args.timestamp_column,
        warmup_rows=args.warmup_rows,
        separator=args.separator,
        progress=sys.stderr if shown else None,
    )
    _LOG.info(
        "%d rows scored, %d anomalous; watched: %s",
        summary.rows,
        summary.anomalies,
        ", ".join(summary.columns),
    )


def _ttf(args: argparse.Namespace) -> None:
    from diagnostics.ttfcsv import predict_csv

    to_stdout = args.output is None
    shown = args.progress or (sys.stderr.isatty() and (not to_stdout or sys.stdout.isatty()))

    def progress(line: str) -> None:
        print(f"ttf: {line}", file=sys.stderr, flush=True)  # noqa: T201 - progress on stderr

    summary = predict_csv(
        args.history,
        args.input,
        sys.stdout if to_stdout else args.output,
        unit_column=args.unit_column,
        time_column=args.time_column,
        cap=args.cap,
        coverage=args.coverage,
        progress=progress if shown else None,
    )
    _LOG.info(
        "learnt from %d histories (%d rows; metrics used: %s; %d operating regime(s);"
        " cross-validated RMSE %.4g); predicted %d units",
        summary.history_units,
        summary.history_rows,
        ", ".join(summary.used_metrics),
        summary.regimes,
        summary.cv_rmse,
        summary.units,
    )


async def _diagnostics(settings: Settings, stop: asyncio.Event) -> None:
    from diagnostics.service import DiagnosticsService
    from fixloop.observe import diagnostics_endpoint

    config = in_data_dir(settings).diagnostics
    if config.partitions:
        await _partitioned_diagnostics(settings, config, stop)
        return
    async with (
        DiagnosticsService(settings.mqtt, settings.influx, config) as service,
        diagnostics_endpoint(service, config.metrics_host, config.metrics_port),
    ):
        await _run_until_stop(service.run(), stop)


async def _partitioned_diagnostics(
    settings: Settings, config: DiagnosticsSettings, stop: asyncio.Event
) -> None:
    """One worker of partitioned diagnostics (leases in PostgreSQL, else sole owner)."""
    from diagnostics.leases import PartitionStore, PostgresPartitionStore, SoleOwnerStore
    from diagnostics.partition import PartitionedDiagnostics
    from fixloop.observe import diagnostics_endpoint

    async with contextlib.AsyncExitStack() as stack:
        store: PartitionStore = SoleOwnerStore()
        if config.lease_url is not None:
            store = await stack.enter_async_context(
                PostgresPartitionStore(config.lease_url.get_secret_value())
            )
        else:
            _LOG.info(
                "no diagnostics.lease_url: this worker holds all %d partitions", config.partitions
            )
        worker = await stack.enter_async_context(
            PartitionedDiagnostics(settings.mqtt, settings.influx, config, store)
        )
        await stack.enter_async_context(
            diagnostics_endpoint(worker, config.metrics_host, config.metrics_port)
        )
        await _run_until_stop(worker.run(), stop)


async def _notifier(settings: Settings, stop: asyncio.Event) -> None:
    from fixloop.observe import notifier_endpoint
    from fixloop.onboarding import service_onboarding
    from notifier.service import NotifierService

    config = in_data_dir(settings).notifier
    async with (
        NotifierService(
            settings.mqtt,
            settings.influx,
            config,
            onboarding=lambda store: service_onboarding(settings, store),
        ) as service,
        notifier_endpoint(service, config.metrics_host, config.metrics_port),
    ):
        _LOG.info("owner API on %s (OpenAPI at /openapi.json)", service.api_url)
        await _run_until_stop(service.run(), stop)


async def _dashboard(settings: Settings, stop: asyncio.Event) -> None:
    from dashboard.service import DashboardService
    from fixloop.observe import dashboard_endpoint

    settings = in_data_dir(settings)
    config = settings.dashboard.model_copy(update={"users_file": ops_users_file(settings)})
    async with (
        DashboardService(
            settings.mqtt,
            settings.influx,
            config,
            db_path=settings.notifier.db_path,
            store_url=None
            if settings.notifier.store_url is None
            else settings.notifier.store_url.get_secret_value(),
            store_pool_size=settings.notifier.store_pool_size,
        ) as service,
        dashboard_endpoint(service, config.metrics_host, config.metrics_port),
    ):
        await _run_until_stop(service.run(), stop)


def _progress_bar(done: float, readings: int) -> None:
    """One line on stderr, redrawn in place on a terminal."""
    width = 30
    filled = round(done * width)
    line = f"training [{'#' * filled}{'.' * (width - filled)}] {done:4.0%}  {readings:,} readings"
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line + ("\n" if done >= 1 else ""))
    elif done >= 1 or filled % 5 == 0:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


async def _train(settings: Settings) -> None:
    from diagnostics.training import train_from_influx
    from fixloop.failures import recorded_failures

    settings = in_data_dir(settings)
    failures = await recorded_failures(settings.notifier)
    report = await train_from_influx(
        settings.influx, settings.diagnostics, progress=_progress_bar, failures=failures
    )
    _LOG.info(
        "trained on %d readings of %d devices: %s; saved to %s",
        report.readings,
        report.devices,
        ", ".join(f"{model} ({rows} rows)" for model, rows in sorted(report.models.items())),
        report.path,
    )
    if failures:
        _LOG.info(
            "remaining life learnt from %d recorded failures: %s",
            len(failures),
            ", ".join(f"{key} ({n})" for key, n in sorted(report.lifetimes.items())) or "none",
        )


async def _up(settings: Settings, stop: asyncio.Event) -> None:
    from fixloop.local import run_local_stack

    await run_local_stack(settings, stop)


def _products_check(files: Sequence[Path]) -> int:
    """Check product files; print each problem (file:line: key: why); 1 if any."""
    from device_sim.described import check_simulation
    from diagnostics.product import ProductError, load_product

    failed = 0
    for path in files:
        try:
            product = load_product(path)
        except ProductError as exc:
            failed += 1
            for problem in exc.problems:
                print(problem)  # noqa: T201 - the command's output
            continue
        found = check_simulation(path) if product.simulation else []
        for line in found:
            print(line)  # noqa: T201
        if found:
            failed += 1
            continue
        print(  # noqa: T201
            f"{path}: ok: model {product.model}, {len(product.metrics)} metrics, "
            f"{len(product.states)} states, {len(product.features)} features, "
            f"{len(product.faults)} faults" + (", simulation" if product.simulation else "")
        )
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fixloop`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    environ = {**os.environ, **_overrides(args)}
    if args.command == "products" and args.products_command == "check":
        # a product file is checked on its own, whatever the settings say
        return _products_check(args.files)
    try:
        settings = load_settings(args.config, environ)
        if args.command == "gateway":
            retire = args.retire
            asyncio.run(_until_signalled(lambda stop: _gateway(settings, stop, retire=retire)))
        elif args.command == "sim":
            asyncio.run(_until_signalled(lambda stop: _sim(settings, stop, args.ground_truth)))
        elif args.command == "up":
            asyncio.run(_until_signalled(lambda stop: _up(settings, stop), args.run_for_s))
        elif args.command == "detect":
            _detect(args)
        elif args.command == "ttf":
            _ttf(args)
        elif args.command == "diagnostics":
            asyncio.run(_until_signalled(lambda stop: _diagnostics(settings, stop)))
        elif args.command == "notifier":
            asyncio.run(_until_signalled(lambda stop: _notifier(settings, stop)))
        elif args.command == "dashboard":
            asyncio.run(_until_signalled(lambda stop: _dashboard(settings, stop)))
        elif args.command == "ops-users":
            return run_ops_users(args, settings)
        elif args.command == "devices" and args.devices_command == "credentials":
            return run_credentials(args, settings)
        elif handles(args):
            return run_registry(args, settings)
        elif args.command == "train":
            asyncio.run(_train(settings))
    except ConfigError as exc:
        print(f"fixloop: error: {exc}", file=sys.stderr)  # noqa: T201 - the CLI's voice
        return 2
    except FixloopError as exc:
        print(f"fixloop: {exc}", file=sys.stderr)  # noqa: T201
        return 1
    except KeyboardInterrupt:
        return 130
    with contextlib.suppress(Exception):
        logging.shutdown()
    return 0
