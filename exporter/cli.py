"""Command line: run, demo, master, check-config, render.

Exit codes: 0 ok, 2 bad config or usage (every error printed with its key path), 1 a failure
while running.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from exporter import __version__, logs
from exporter.config import (
    MIN_TOKEN_LENGTH,
    Config,
    ConfigError,
    load_config,
    read_token,
    summary,
)

if TYPE_CHECKING:
    from exporter.service import Service

log = logging.getLogger(__name__)
SHUTDOWN_DEADLINE = 10.0


def _load(path: str) -> Config | None:
    """The validated config, or None after printing every error with its key path."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{path}: {len(exc.errors)} error(s)", file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        return None


async def serve_until_signalled(
    service: Service, host: str | None = None, port: int | None = None
) -> None:
    """Run a Service and its HTTP surface until SIGTERM/SIGINT (then stop within
    SHUTDOWN_DEADLINE); SIGHUP reloads its config."""
    from exporter.web.server import running

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(service.reload()))

    async def serve() -> None:
        async with running(service, host, port):
            # what start-up built lives as long as the process: kept out of the collector's
            # full passes, which otherwise stall the loop for 100+ ms at 10,000 masters
            gc.freeze()
            await stop.wait()
            log.info("shutting down (deadline %.0fs)", SHUTDOWN_DEADLINE)

    serving = asyncio.create_task(serve())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    try:
        await asyncio.wait_for(serving, SHUTDOWN_DEADLINE)
    except TimeoutError:
        log.error("shutdown did not finish within %.0fs", SHUTDOWN_DEADLINE)


def cmd_run(args: argparse.Namespace) -> int:
    from exporter.probing.loop import install_fast_loop
    from exporter.service import Service
    from exporter.store import StoreError

    install_fast_loop()  # uvloop where installed: the probe hot loop is mostly loop work

    cfg = _load(args.config)
    if cfg is None:
        return 2
    try:
        token = read_token(cfg.api)
    except ConfigError as exc:  # unreadable or too short: never runs, whatever the flags
        print(f"refusing to start: {'; '.join(exc.errors)}", file=sys.stderr)
        return 2
    if token is None and not args.insecure_no_auth:
        if cfg.api.token_file:
            source = f"api.token_file {cfg.api.token_file}"
        elif cfg.api.token_env:
            source = f"${cfg.api.token_env}"
        else:
            source = "the config (api.token_env or api.token_file)"
        print(
            f"refusing to start: mutating endpoints need a bearer token of at least "
            f"{MIN_TOKEN_LENGTH} characters and {source} holds none (unset, empty or only "
            "whitespace); set one, or start with --insecure-no-auth to run without "
            "authentication",
            file=sys.stderr,
        )
        return 2
    if token is None:
        log.warning("running with --insecure-no-auth: mutating endpoints accept any caller")
    try:
        service = Service(cfg, args.config, token=token, insecure_no_auth=args.insecure_no_auth)
    except StoreError as exc:  # missing, read-only, a directory, corrupt: one line, no traceback
        print(f"refusing to start: state_path {exc}", file=sys.stderr)
        return 2
    log.info("%s", summary(cfg))
    asyncio.run(serve_until_signalled(service, args.host, args.port))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.path)
    if cfg is None:
        return 2
    print(summary(cfg))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from exporter.rules import render

    cfg = _load(args.config)
    if cfg is None:
        return 2
    for path in render(cfg, Path(args.out)):
        print(path)
    return 0


def cmd_master(args: argparse.Namespace) -> int:
    from exporter.sim.master import serve_master

    def announce(url: str) -> None:
        # the one line on stdout: how a parent learns the port when it passed --port 0
        print(f"listening on {url}", flush=True)

    asyncio.run(
        serve_master(
            args.name, args.port, args.region, args.role, args.host, args.drain_rate,
            on_listening=announce,
        )
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from exporter.probing.loop import install_fast_loop
    from exporter.sim.demo import run_demo

    install_fast_loop()
    asyncio.run(run_demo(args))
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    """One line per requirement; 0 only when the master conforms, 2 for a bad URL."""
    from exporter.conformance import check_master, url_problem

    problem = url_problem(args.url)
    if problem is not None:
        print(f"conformance: {problem}", file=sys.stderr)
        return 2
    results = asyncio.run(check_master(args.url, destructive=args.destructive,
                                       epoch=args.epoch, timeout=args.timeout))
    for result in results:
        print(result.line(), flush=True)
    failed = sum(not r.ok for r in results)
    print(f"conformance of {args.url}: {len(results)} requirements, {failed} failed",
          file=sys.stderr)
    return 1 if failed else 0


def _positive(kind: type[int] | type[float], high: float) -> Callable[[str], float]:
    """An argparse type for a number in (0, high]: a bad value is a usage error (exit 2)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0 < value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not between 0 (excluded) and {high:g}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ha-exporter", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"ha-exporter {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the exporter with a config file")
    run.add_argument("--config", required=True)
    run.add_argument("--host", help="override listen.host")
    run.add_argument("--port", type=int, help="override listen.port")
    run.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="allow mutating endpoints without a bearer token (logged at start)",
    )
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser("demo", help="simulated fleet plus exporter in one command")
    demo.add_argument("--port", type=int, default=9108, help="exporter port")
    demo.add_argument("--master-port", type=int, default=9201, help="first simulated master port")
    demo.add_argument("--chaos", action="store_true", help="fail and heal masters on a schedule")
    demo.add_argument("--chaos-every", type=float, default=40.0, metavar="SECONDS")
    demo.add_argument("--interval", default="2s", help="probe interval")
    demo.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="stop by itself after this many seconds (0: until Ctrl-C)",
    )
    demo.add_argument("--state-dir", default=None, help="where the demo keeps its SQLite state")
    demo.set_defaults(func=cmd_demo)

    master = sub.add_parser("master", help="one simulated master process")
    master.add_argument("--name", required=True)
    master.add_argument(
        "--port",
        type=int,
        required=True,
        help="port to listen on; 0 picks a free one (printed on stdout: 'listening on URL')",
    )
    master.add_argument("--region", default="default")
    master.add_argument("--role", default="active", choices=["active", "standby"])
    master.add_argument("--host", default="127.0.0.1")
    master.add_argument(
        "--drain-rate", type=float, default=50.0, help="pending messages processed per second"
    )
    master.set_defaults(func=cmd_master)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("path")
    check.set_defaults(func=cmd_check_config)

    render = sub.add_parser("render", help="render alert rules from a config's thresholds")
    render.add_argument("--config", required=True)
    render.add_argument("--out", required=True)
    render.set_defaults(func=cmd_render)

    conf = sub.add_parser(
        "conformance",
        help="check a running master against the master protocol (docs/protocol.md)",
        description="Prints PASS/FAIL and the why of every requirement; exit 0 only when all "
        "pass, 1 when any fails, 2 on usage errors.",
    )
    conf.add_argument("url", help="the master's base URL, e.g. http://127.0.0.1:9201")
    conf.add_argument(
        "--destructive",
        action="store_true",
        help="also import, activate, release and fence (the master stops serving for a moment; "
        "what it served is restored at the end): run it on a master out of rotation",
    )
    conf.add_argument(
        "--epoch",
        type=_positive(int, 2**63 - 1),
        help="fencing epoch of the control calls (default: the one /health reports, else 1)",
    )
    conf.add_argument(
        "--timeout", type=_positive(float, 300), default=5.0, metavar="SECONDS",
        help="per call (default 5)",
    )
    conf.set_defaults(func=cmd_conformance)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
