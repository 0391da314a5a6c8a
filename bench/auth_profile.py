"""`python -m bench.auth_profile`: where the sender checks spend their CPU, in-process.

The same signed backlog, zone and envelopes as `python -m bench auth` (its
helpers build them), a real DNS server on loopback (bench/dns.py), and one
`Authenticator` called the way the ingester calls it. A first pass warms the
resolver cache (and whatever else caches per process); the timed passes then
show the steady "warm" state. Printed: µs per message per stage (wall time of
the stage; one thread, so about its CPU), for `check` called inline and for
`check_many` in chunks of 64 (the ingester's path, thread-pool hops included);
each result also goes through `to_dict`, as in the ingester.

Caches keyed on per-message data (SPF results on client address and domain,
From fields, client addresses) are emptied before every timed pass: replaying
the same messages would otherwise hit them every time, which real mail (and
`bench auth`, ~40 % repeats per process) does not. Caches keyed on DNS
records (parsed keys, DMARC records) stay warm, as they are after the first
few messages of each domain.

  --profile        also run cProfile over one inline pass and print the top
                   functions (--top N, sorted by --sort tottime|cumulative)
  --cold-caches    also empty the record-keyed caches before each pass (what
                   they save); the resolver's cache always stays warm
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections import defaultdict
from contextlib import contextmanager

from . import auth as B
from . import common as C
from .dns import BenchDNS

CHUNK = 64  # mtasidecar.ingest.maildir.CHUNK


def build(n: int, domains: int, seed: int, size: int) -> list[tuple]:
    """[(raw as Postfix stores it, sender, client_ip, helo)] for n signed messages."""
    from mtasidecar.mail.envelope import read_trace
    corpus = C.corpus(n, seed=seed, size=size)
    keys = B.keys_for(corpus)
    _senders, signed = B.backlog("zipf", corpus, keys, domains, seed)
    now = time.time()
    items = []
    for i, msg in enumerate(signed):
        raw = C.postfix_trace(msg, i, now)
        env = read_trace(raw)
        items.append((raw, env.sender, env.client_ip, env.client_helo))
    zone: dict = {}
    B.add_domains(zone, keys, "zipf", domains)
    return items, zone


class Stages:
    """Wraps named callables with wall-clock timers (nested calls count in both)."""

    def __init__(self):
        self.total = defaultdict(float)
        self._undo = []

    def wrap(self, owner, attr: str, label: str) -> None:
        if not hasattr(owner, attr):
            return  # a stage the current code does not have
        orig = getattr(owner, attr)
        had = attr in vars(owner)
        total = self.total

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                total[label] += time.perf_counter() - t

        setattr(owner, attr, timed)
        self._undo.append((owner, attr, orig, had))

    def undo(self) -> None:
        for owner, attr, orig, had in reversed(self._undo):
            if had:
                setattr(owner, attr, orig)
            else:
                delattr(owner, attr)  # it was a method of the class
        self._undo.clear()

    def reset(self) -> None:
        self.total.clear()


def instrument(auth) -> Stages:
    from mtasidecar.mail import auth as A
    s = Stages()
    # Instance attributes: only this Authenticator is timed.
    for attr, label in [("_prefetch", "prefetch (cache probes)"), ("_check_spf", "SPF"),
                        ("_check_dkim", "DKIM (all signatures)"), ("_check_dmarc", "DMARC")]:
        s.wrap(auth, attr, label)
    for attr, label in [("_parse_message", "parse (dkimpy headers/body)"),
                        ("_from_domains", "From domains"),
                        ("_txt_names_needed", "names to prefetch"),
                        ("_authentication_results", "A-R header")]:
        s.wrap(A, attr, label)
    s.wrap(A.AuthResult, "to_dict", "to_dict")
    return s


PER_MESSAGE_CACHES = ("_from_domains_of", "_parse_ip_cached")  # module functions of mtasidecar.mail.auth


def clear_caches(auth, everything: bool) -> None:
    """Empty the caches keyed on per-message data; with everything, all but the resolver's."""
    from mtasidecar.mail import auth as A
    from mtasidecar.mail import dmarc
    spf_results = getattr(auth, "_spf_results", None)
    if spf_results is not None:
        spf_results.clear()
    for mod in (A, dmarc) if everything else (A,):
        for name in dir(mod):
            obj = getattr(mod, name)
            if hasattr(obj, "cache_clear") and (everything or name in PER_MESSAGE_CACHES):
                if name != "org_domain":  # not DNS-derived
                    obj.cache_clear()


def run_pass(auth, items, mode: str) -> float:
    t = time.perf_counter()
    # to_dict too: the ingester stores every result that way.
    if mode == "inline":
        for item in items:
            auth.check(*item).to_dict()
    else:
        for i in range(0, len(items), CHUNK):
            for result in auth.check_many(items[i:i + CHUNK]):
                result.to_dict()
    return time.perf_counter() - t


@contextmanager
def _cpu():
    t = time.process_time()
    box = [0.0]
    yield box
    box[0] = time.process_time() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.auth_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--domains", type=int, default=50)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--size", type=int, default=10_000)
    p.add_argument("--passes", type=int, default=3, help="timed passes per mode; the best is shown")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--top", type=int, default=35)
    p.add_argument("--sort", default="tottime")
    p.add_argument("--cold-caches", action="store_true")
    args = p.parse_args(argv)

    B._tests_importable()
    from mtasidecar.mail.auth import Authenticator

    items, zone = build(args.n, args.domains, args.seed, args.size)
    n = len(items)
    mean = sum(len(i[0]) for i in items) / n
    with BenchDNS(zone) as dns, Authenticator([("127.0.0.1", dns.port)], hostname="bench.localhost",
                                              max_workers=2 * CHUNK) as auth:
        t = time.perf_counter()
        first = [auth.check(*item) for item in items]  # warms the resolver cache
        warm_s = time.perf_counter() - t
        counts = defaultdict(int)
        for r in first:
            counts["spf " + r.spf.result] += 1
            counts["dmarc " + r.dmarc.result] += 1
            for d in r.dkim:
                counts["dkim " + d.result] += 1
        print(f"{n} messages, mean {mean:.0f} bytes; first (cold) pass {warm_s / n * 1e6:.0f} µs/msg, "
              f"{dns.queries} DNS queries")
        print("verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))

        stages = instrument(auth)
        for mode in ("inline", "check_many"):
            best = None
            for _ in range(args.passes):
                clear_caches(auth, args.cold_caches)
                stages.reset()
                with _cpu() as cpu:
                    wall = run_pass(auth, items, mode)
                if best is None or cpu[0] < best[1]:
                    best = (wall, cpu[0], dict(stages.total))
            wall, cpu, totals = best
            print(f"\n{mode}: {wall / n * 1e6:.0f} µs/msg wall, {cpu / n * 1e6:.0f} µs/msg CPU "
                  f"(process, all threads; best of {args.passes})")
            if mode == "inline":
                for label, secs in sorted(totals.items(), key=lambda kv: -kv[1]):
                    print(f"  {label:32s} {secs / n * 1e6:8.1f} µs/msg")
        stages.undo()

        if args.profile:
            clear_caches(auth, args.cold_caches)
            prof = cProfile.Profile()
            prof.enable()
            run_pass(auth, items, "inline")
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(args.sort).print_stats(args.top)
            print(f"\ncProfile of one inline pass ({n} messages; times are totals, divide by {n}):")
            print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
