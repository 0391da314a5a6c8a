"""`python -m bench corpus`: generate the corpus and describe it (kinds, charsets, sizes, parse speed)."""

from __future__ import annotations

import argparse
import collections
import re
import time

from . import common as C


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--size", type=int, default=10_000)
    p.add_argument("--dump", metavar="DIR", help="also write each message as DIR/<index>.eml")


def run(args, argv: list[str]) -> C.Report:
    from mtasidecar.mail.parse import parse

    report = C.Report("corpus", argv, C.machine_info())
    from . import corpus as corpus_mod
    t = time.perf_counter()
    msgs = corpus_mod.generate(args.n, seed=args.seed, size=args.size)  # not the cache: timed
    gen_s = time.perf_counter() - t
    if args.dump:
        from pathlib import Path
        d = Path(args.dump)
        d.mkdir(parents=True, exist_ok=True)
        for i, m in enumerate(msgs):
            (d / f"{i:06d}.eml").write_bytes(m)
    charsets = collections.Counter()
    kinds = collections.Counter()
    dkim = collections.Counter()
    for m in msgs:
        head = m[:m.find(b"\n\n")]
        sig = re.search(rb"^DKIM-Signature:.*?\ba=([\w-]+)", head, re.M | re.S)
        dkim["none" if not sig else "ed25519 (valid)" if sig.group(1) == b"ed25519-sha256"
             else "rsa (no key published)"] += 1
        top = re.search(rb"^Content-Type: (multipart/\w+|text/\w+)", head, re.M | re.I)
        kinds[top.group(1).decode().lower() if top else "?"] += 1
        for cs in set(re.findall(rb'^Content-Type: text/\w+; charset="?([\w-]+)', m, re.M | re.I)):
            charsets[cs.decode().lower()] += 1
    t = time.perf_counter()
    errors = sum(1 for m in msgs if parse(m).parse_error)
    parse_s = time.perf_counter() - t
    sizes = sorted(map(len, msgs))
    t1 = C.Table(["messages", "mean bytes", "min", "p50", "max", "generate s", "parse msg/s (1 core)",
                  "parse errors"])
    t1.add(len(msgs), f"{sum(sizes) / len(sizes):.0f}", sizes[0], sizes[len(sizes) // 2], sizes[-1],
           f"{gen_s:.1f}", f"{len(msgs) / parse_s:.0f}", errors)
    t2 = C.Table(["top-level type", "messages"])
    for k, v in kinds.most_common():
        t2.add(k, v)
    t3 = C.Table(["charset", "messages using it"])
    for k, v in charsets.most_common():
        t3.add(k, v)
    t4 = C.Table(["DKIM signature", "messages"])
    for k, v in dkim.most_common():
        t4.add(k, v)
    report.tables += [t1, t2, t3, t4]
    return report
