"""`python -m bench.ingest_profile`: where an ingested message's CPU goes, in one process.

The seeded corpus (bench.corpus, with the trace headers Postfix writes, as
bench.ingest_backlog builds it) goes through the ingester's own code, sender
checks off: ``prepare_many`` on chunks of CHUNK files (what a worker process
does), a pickle round trip (the hop back to the main process), then
``Pipeline.commit`` (Store.ingest in one transaction, then the unlinks) into a
fresh SQLite file. Stages are timed by wrapping the names the pipeline calls,
so the figures follow the code; "other" is what the wrappers do not cover.

  --n N         messages (default 3000)
  --repeat R    runs; per stage the fastest run is reported (default 3)
  --cprofile    also run once under cProfile and print the top functions
  --chunk C     files per prepare/commit batch (default: the ingester's CHUNK;
                1 shows what a message costs when mail trickles in one by one)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pickle
import pstats
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench import common as C
from mtasidecar.ingest import maildir as ingest_maildir
from mtasidecar.ingest import pipeline as P
from mtasidecar.mail.blocklist import Blocklist
from mtasidecar.store import Store
from mtasidecar.store import store as store_mod

CHUNK = ingest_maildir.CHUNK
MAX_SIZE = 50 * 1024 * 1024

# (module, attribute, stage): wrapped while a run lasts. Attributes a version
# of the pipeline does not have are skipped.
_STAGES = [
    (P, "read_spool_file", "read"),
    (P, "read_trace", "envelope"),
    (P, "parse", "parse"),
    (P, "_document", "document dict"),
    (P, "extract", "extract"),
    (P, "_mark_blocked", "blocklist"),
    (P, "make_intro", "intro"),
    (P, "_encode_document", "document JSON+zstd"),
    (P, "_compress_raw", "raw zstd"),
    (P.Pipeline, "_retire", "unlink"),
    (store_mod.Store, "ingest", "Store.ingest"),
]


class Timer:
    def __init__(self):
        self.t: dict[str, float] = defaultdict(float)
        self.active: str | None = None  # nested stages count once, in the outer one

    def wrap(self, fn, stage: str):
        t = self.t
        clock = time.perf_counter

        def timed(*a, **kw):
            if self.active is not None:
                return fn(*a, **kw)
            self.active = stage
            t0 = clock()
            try:
                return fn(*a, **kw)
            finally:
                t[stage] += clock() - t0
                self.active = None

        return timed


def write_spool(msgs: list[bytes], new_dir: Path) -> list[str]:
    now = time.time()
    paths = []
    for i, msg in enumerate(msgs):
        p = new_dir / C.maildir_name(i, now + i * 1e-4)
        p.write_bytes(C.postfix_trace(msg, i, now))
        paths.append(str(p))
    return paths


def run_once(msgs: list[bytes], timer: Timer | None, profiler: cProfile.Profile | None = None) -> dict:
    base = Path(tempfile.mkdtemp(prefix="ingest-profile-", dir="/tmp"))
    try:
        maildir = base / "Maildir"
        ingest_maildir.ensure_maildir(maildir)
        paths = write_spool(msgs, maildir / "new")
        store = Store(f"sqlite:///{base / 'mtasidecar.db'}")
        store.setup()
        store.sync_domains([("bench.test", True, "public")])
        pipeline = P.Pipeline(store, maildir)
        blocked = Blocklist.of(["exe", "scr", "js"], ["application/x-msdownload"])
        originals = []
        if timer is not None:
            for owner, name, stage in _STAGES:
                if hasattr(owner, name):
                    fn = getattr(owner, name)
                    originals.append((owner, name, fn))
                    setattr(owner, name, timer.wrap(fn, stage))
        t_prepare = t_pickle = t_commit = 0.0
        cpu0 = time.process_time()
        if profiler is not None:
            profiler.enable()
        try:
            for i in range(0, len(paths), CHUNK):
                chunk = paths[i:i + CHUNK]
                t0 = time.perf_counter()
                prepared = P.prepare_many(chunk, MAX_SIZE, None, blocked, {"bench.test": (True, "keep")})
                t1 = time.perf_counter()
                prepared = pickle.loads(pickle.dumps(prepared, pickle.HIGHEST_PROTOCOL))
                t2 = time.perf_counter()
                pipeline.commit(prepared)
                t3 = time.perf_counter()
                t_prepare += t1 - t0
                t_pickle += t2 - t1
                t_commit += t3 - t2
        finally:
            if profiler is not None:
                profiler.disable()
            for owner, name, fn in reversed(originals):
                setattr(owner, name, fn)
        cpu = time.process_time() - cpu0
        assert store.count_messages() == len(msgs), (store.count_messages(), len(msgs))
        store.close()
        return {"prepare": t_prepare, "pickle": t_pickle, "commit": t_commit, "cpu": cpu}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest_profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--chunk", type=int, default=ingest_maildir.CHUNK)
    ap.add_argument("--top", type=int, default=35)
    args = ap.parse_args(argv)
    globals()["CHUNK"] = args.chunk  # read by run_once

    msgs = C.corpus(args.n, seed=args.seed, size=args.size)
    n = len(msgs)
    print(f"corpus: {n} messages, mean {sum(map(len, msgs)) / n:.0f} bytes; chunks of {args.chunk}; "
          f"sender checks off; pid {os.getpid()}")
    best: dict[str, float] = {}
    for r in range(args.repeat):
        timer = Timer()
        totals = run_once(msgs, timer)
        stages = dict(timer.t)
        covered_prepare = sum(v for k, v in stages.items() if k not in ("Store.ingest", "unlink"))
        stages["prepare: other"] = totals["prepare"] - covered_prepare
        stages["pickle round trip"] = totals["pickle"]
        stages["commit: other"] = totals["commit"] - stages.get("Store.ingest", 0) - stages.get("unlink", 0)
        stages["= wall total"] = totals["prepare"] + totals["pickle"] + totals["commit"]
        stages["= CPU total"] = totals["cpu"]
        print(f"run {r + 1}: {stages['= wall total'] / n * 1e6:.0f} µs/msg wall, "
              f"{totals['cpu'] / n * 1e6:.0f} µs/msg CPU", flush=True)
        for k, v in stages.items():
            best[k] = min(best.get(k, v), v)
    order = [s for _, _, s in _STAGES if s in best and s not in ("Store.ingest", "unlink")]
    order += ["prepare: other", "pickle round trip", "Store.ingest", "unlink", "commit: other",
              "= wall total", "= CPU total"]
    print(f"\nµs per message, fastest of {args.repeat} runs per stage:")
    for k in order:
        if k in best:
            print(f"  {k:<22} {best[k] / n * 1e6:8.1f}")

    if args.cprofile:
        prof = cProfile.Profile()
        run_once(msgs, None, prof)
        out = io.StringIO()
        st = pstats.Stats(prof, stream=out)
        st.sort_stats("tottime").print_stats(args.top)
        st.sort_stats("cumulative").print_stats(args.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
