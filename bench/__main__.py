"""mtasidecar benchmarks: `python -m bench <name> [options] [--record]`.

  ingest-backlog  drain N mails already in Maildir/new/ (msg/s, ingester RSS)
  trickle         the ingester's CPU per message when files arrive one at a time, as Postfix delivers
  smtp-e2e        Postfix alone vs the whole service, N mails over K SMTP connections
  latency         steady SMTP load; 250 reply → row in the DB / visible in the API
  api-list        list / message / raw GET rates on a big database (wrk)
  waiters         1,000 open long-polls + SSE streams: added GET latency, wake-up latency, CPU, RSS
  create          mailbox creation through the API (POST /api/v1/mailboxes, wrk): creations/s, p50/p99
  sender          how fast our SMTP sender and smtp-source go against smtp-sink
  corpus          generate the corpus and print what is in it
  compare         side by side with maildev and maildump (end to end, API, memory) and our scaling curve
  all             everything above in turn, then docs/benchmarks.md and the charts in docs/img/

Each prints tables; `--record` also writes them into docs/benchmarks.md
(replacing that benchmark's previous section). Run as root (the smtp
benchmarks start private Postfix instances); everything listens on
127.0.0.1 only and is stopped at the end, failures included.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import common as C

BENCHES = {
    "ingest-backlog": "ingest_backlog",
    "trickle": "trickle",
    "smtp-e2e": "smtp_e2e",
    "latency": "latency",
    "api-list": "api_list",
    "sender": "sender",
    "corpus": "corpus_info",
    "auth": "auth",
    "policy": "policy",
    "waiters": "waiters",
    "create": "create",
    "compare": "compare",
    "all": "all",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="bench", required=True)
    modules = {}
    for name, mod in BENCHES.items():
        module = importlib.import_module(f".{mod}", __package__)
        modules[name] = module
        p = sub.add_parser(name, help=(module.__doc__ or "").split("\n")[0])
        module.add_arguments(p)
        p.add_argument("--record", action="store_true", help="write the results into docs/benchmarks.md")
    args = parser.parse_args(argv)
    try:
        report = modules[args.bench].run(args, argv)
    except C.BenchError as exc:
        print(f"bench {args.bench}: {exc}", file=sys.stderr)
        return 1
    print()
    print(report.text())
    if args.record:
        C.record(report)
        print(f"\nrecorded in {C.DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
