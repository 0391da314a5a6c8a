"""The `mtasidecar` command. Subcommands mirror the processes:

  ingest     watch the Maildir and store what arrives
  api        serve the HTTP API (gunicorn, asgi workers)
  deliver    Postfix pipe(8) entry: spool stdin into the Maildir
  policy     Postfix policy service: refuse unknown mailboxes, rates, sizes at RCPT
  sweep      delete expired mailboxes and old messages
  webhooks   POST new messages to their webhooks (the outbox sender)
  init-db    create the schema and record the configured domains
  postfix    print or apply the Postfix configuration for these settings
  dev        a private Postfix + ingester + API on loopback, in one go
  config     print the validated settings
  doctor     check DNS, Postfix, the services and the spool for a domain

This is the one module that wires processes together. Heavy imports happen
inside the subcommands: `deliver` runs once per message and must start fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_CONFIG = 2


def _settings(args, overrides: dict | None = None):
    from .config import load
    return load(args.config, overrides=overrides)


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _prepare_store(settings):
    from .store import Store
    store = Store(settings.database_url, operator_webhook_url=settings.webhooks.url)
    store.setup()
    store.sync_domains([(d.name, d.subdomains, d.mode) for d in settings.domains])
    return store


def cmd_init_db(args) -> int:
    settings = _settings(args)
    _prepare_store(settings).close()
    print(f"database ready: {settings.database_url}")
    return 0


def cmd_config(args) -> int:
    import dataclasses
    import json
    settings = _settings(args)
    print(json.dumps(dataclasses.asdict(settings), indent=2))
    return 0


def usable_cores() -> int:
    """Cores this process may run on (taskset and cpusets count; os.cpu_count does not)."""
    import os
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cmd_ingest(args) -> int:
    import signal

    from .domains import DomainRegistry
    from .ingest.maildir import Ingester
    settings = _settings(args)
    _logging(args.verbose)
    store = _prepare_store(settings)
    registry = DomainRegistry(settings, store)
    # Default: a worker per core. This process only commits (~0.15 ms a
    # message against ~1.2 ms of parsing and checks in a worker), so keeping
    # a core for it left most of that core idle: on 2 cores a backlog drains
    # ~50 % faster with 2 workers than with 1 (docs/benchmarks.md).
    workers = settings.ingest.workers if settings.ingest.workers >= 0 else usable_cores()
    ingester = Ingester(store, settings.maildir_path, keep=settings.maildir.keep,
                        max_size=settings.maildir.max_message_size,
                        rescan_interval=settings.maildir.rescan_interval, workers=workers,
                        auth=settings.auth_config(), blocked=settings.blocklist(),
                        domains=lambda: registry.snapshot().auth_failure_map())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: ingester.stop())
    ingester.run()
    return 0


def cmd_sweep(args) -> int:
    import signal
    import threading

    from . import sweep
    settings = _settings(args)
    _logging(args.verbose)
    store = _prepare_store(settings)
    if args.once:
        counts = sweep.sweep_once(store, settings)
        print(f"swept {counts['mailboxes']} mailboxes and {counts['messages']} messages")
        return 0
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    sweep.run(store, settings, args.interval, stop)
    return 0


def cmd_webhooks(args) -> int:
    from . import webhooks
    settings = _settings(args)
    _logging(args.verbose)
    return webhooks.run(_prepare_store(settings), settings)


def cmd_policy(args) -> int:
    from . import policy
    settings = _settings(args)
    _logging(args.verbose)
    return policy.run(settings, _prepare_store(settings))


def cmd_doctor(args) -> int:
    from . import doctor
    return doctor.command(_settings(args), args)


def gunicorn_argv(settings) -> list[str]:
    api = settings.api
    return [sys.executable, "-m", "gunicorn", "-k", "asgi", "-w", str(api.workers),
            "-b", f"{api.host}:{api.port}", "--no-control-socket",
            # Open event streams hold shutdown up; clients reconnect.
            "--graceful-timeout", "3", "--access-logfile", "-" if api.access_log else "/dev/null",
            "mtasidecar.api.asgi:app"]


def cmd_api(args) -> int:
    import os

    from .config import to_environ
    settings = _settings(args)
    _prepare_store(settings).close()  # schema before workers, never in them
    env = dict(os.environ, **to_environ(settings))
    argv = gunicorn_argv(settings)
    os.execve(argv[0], argv, env)
    return 0  # pragma: no cover


def cmd_deliver(args) -> int:
    from .ingest.deliver import main
    return main(args.rest)


def cmd_postfix(args) -> int:
    from .mta import commands
    settings = _settings(args)
    return commands.postfix_command(settings, args)


def cmd_dev(args) -> int:
    from . import dev
    from .config import parse_domain_list
    overrides: dict = {"data_dir": args.data_dir, "smtp": {"port": args.smtp_port},
                       "api": {"port": args.http_port}}
    domains = [d for d in args.domain] + [f"public:{d}" for d in args.public_domain]
    if domains:
        overrides["domains"] = parse_domain_list(",".join(domains))
    settings = _settings(args, overrides)
    if not settings.domains:
        # Try-it-now default: a public catch-all, readable without a token.
        overrides["domains"] = [{"name": dev.DEFAULT_DOMAIN, "subdomains": True, "mode": "public"}]
        settings = _settings(args, overrides)
    _logging(args.verbose)
    return dev.run(settings, _prepare_store)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtasidecar", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", metavar="FILE", help="TOML settings file (default: $MTASIDECAR_CONFIG)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("init-db", help="create the schema").set_defaults(func=cmd_init_db)
    sub.add_parser("config", help="print the validated settings").set_defaults(func=cmd_config)
    sub.add_parser("ingest", help="watch the Maildir and store mail").set_defaults(func=cmd_ingest)
    sub.add_parser("api", help="serve the HTTP API under gunicorn").set_defaults(func=cmd_api)
    sub.add_parser("policy", help="serve Postfix's policy delegation protocol").set_defaults(func=cmd_policy)
    sw = sub.add_parser("sweep", help="delete expired mailboxes and old messages")
    sw.add_argument("--once", action="store_true", help="one pass, then exit (for a systemd timer)")
    sw.add_argument("--interval", type=float, default=60.0, help="seconds between passes (default 60)")
    sw.set_defaults(func=cmd_sweep)
    sub.add_parser("webhooks", help="POST new messages to their webhooks, with retries").set_defaults(
        func=cmd_webhooks)

    from . import doctor  # the standard library only: cheap
    doc = sub.add_parser("doctor", help="check that this box receives mail for a domain (exit 1 on a failure)")
    doctor.add_arguments(doc)
    doc.set_defaults(func=cmd_doctor)

    d = sub.add_parser("deliver", help="Postfix pipe(8) entry point", add_help=False)
    d.add_argument("rest", nargs=argparse.REMAINDER)
    d.set_defaults(func=cmd_deliver)

    pf = sub.add_parser("postfix", help="render or apply the Postfix configuration")
    pf.add_argument("action", choices=["show", "apply"], help="show: print it; apply: merge it with postconf")
    pf.add_argument("--config-dir", default="/etc/postfix", help="Postfix configuration directory")
    pf.set_defaults(func=cmd_postfix)

    dev = sub.add_parser("dev", help="run a private Postfix, the ingester and the API on loopback")
    dev.add_argument("--data-dir", default="./data", help="where everything is kept (default ./data)")
    dev.add_argument("--smtp-port", type=int, default=2525)
    dev.add_argument("--http-port", type=int, default=8025)
    dev.add_argument("--domain", action="append", default=[],
                     help="a private domain (mailboxes made through the API, each with its token); "
                          "'*.NAME' also takes any subdomain of NAME (repeatable)")
    dev.add_argument("--public-domain", action="append", default=[],
                     help="a public catch-all domain: any address receives, readable without a token "
                          "(repeatable; with neither option: the configured domains, else public *.mail.test)")
    dev.set_defaults(func=cmd_dev)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Fast path for Postfix's pipe transport: no argparse tree, no config.
    if argv[:1] == ["deliver"]:
        from .ingest.deliver import main as deliver
        return deliver(argv[1:])
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"mtasidecar: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
