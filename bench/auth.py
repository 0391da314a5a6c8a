"""`python -m bench auth` (or `python -m bench.auth`): ingest throughput with SPF/DKIM/DMARC checks.

A backlog of N DKIM-signed corpus mails (~10 KB; From rewritten to ~50 sender
domains d00.test .. d49.test, Zipf-weighted so a few domains send most mail,
as in real traffic; RSA-2048 keys, Ed25519 for every fifth domain) sits in
Maildir/new/ with the trace headers Postfix writes (client 198.51.100.x,
which every domain's SPF authorises). A real DNS server on loopback
(tests/dnsserver.py, in this process) serves SPF (half the domains through an
include:), the DKIM keys and DMARC records (none for every tenth domain).
Then `python -m mtasidecar ingest` runs with a fresh data directory and env
from `mtasidecar.config.to_environ(settings)`.

Variants (each a separate run on a fresh data directory):

  off   checks off (MTASIDECAR_AUTH_ENABLED=false)
  warm  checks on, DNS answers at once
  slow  checks on, DNS answers after 200 ms
  cold  checks on, DNS answers after 200 ms, and every message comes from a
        domain of its own (c00000.test ...): no look-up is ever cached, so
        this shows how much DNS waiting the ingester overlaps (informative,
        not a target)

How a run starts (--start): the resolver cache lives in each ingester
process (the main one and every worker has its own) and starts empty with
the process. 'running' (the default, for off and warm): the ingester is
started on an empty new/ and first ingests a primer (each sender domain's
first message, the cycle PRIME_ROUNDS times, so every worker sees every
domain); then the clock starts and the backlog is moved into new/ by
renames, as virtual(8) links files in. That is an ingester that has been
receiving mail from these senders: the warm cache the 80 % target speaks
of, and flanker's, dkimpy's and pyspf's first-use costs already paid.
'spawn' (always for slow and cold, whose point is waiting on DNS): the
backlog is in new/ before the ingester starts, and the clock runs from its
spawn (interpreter start, imports, the first look-up of every domain in every
process included) until the database holds N rows and new/ is empty. The
table gives the share of look-ups answered from cache, from the queries the
DNS server saw while the clock ran.

Targets: warm ≥ 80 % of off, slow ≥ 50 % of warm (msg/s over the whole run,
medians of --repeat interleaved rounds).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import re
import shutil
import sqlite3
import statistics
import struct
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from mtasidecar.ingest.maildir import ensure_maildir

from . import common as C

TARGET_WARM = 0.80  # warm / off
TARGET_SLOW = 0.50  # slow / warm
CLIENT_NET = "198.51.100.0/24"  # C.postfix_trace's client addresses
SLOW_S = 0.2
VARIANTS = {
    # name: (checks on, DNS delay s, backlog, label)
    "off": (False, 0.0, "zipf", "checks off"),
    "warm": (True, 0.0, "zipf", "checks on, DNS 0 ms"),
    "slow": (True, SLOW_S, "zipf", "checks on, DNS 200 ms"),
    "cold": (True, SLOW_S, "distinct", "checks on, DNS 200 ms, a new domain per message"),
}
INCLUDES = 3  # _spf.esp0.test .. _spf.esp2.test
# --start running: variants whose ingester is primed first (a warm cache is
# their point; slow and cold measure waiting on DNS, so they start empty).
PRIMED = ("off", "warm")
PRIME_ROUNDS = 10  # the primer: each domain's first message, the cycle this many times


def add_arguments(p: argparse.ArgumentParser) -> None:
    # 20,000: a 5,000-message run lasts ~5 s, and on a shared machine a
    # neighbour's burst of a second or two then moved single rounds by ±15 %.
    p.add_argument("--n", type=int, default=20000, help="messages in the backlog (default 20000)")
    p.add_argument("--domains", type=int, default=50, help="sender domains (default 50)")
    p.add_argument("--variants", default="off,warm,slow,cold",
                   help=f"comma-separated, of: {', '.join(VARIANTS)} (default all)")
    p.add_argument("--repeat", type=int, default=3,
                   help="rounds; each round runs every variant once; medians are reported (default 3)")
    p.add_argument("--start", choices=("running", "spawn"), default="running",
                   help="off and warm: 'running' primes a running ingester with mail from every sender "
                        "domain, then moves the backlog in (a warm cache, the default); 'spawn' starts the "
                        "ingester on the backlog and runs the clock from its spawn (caches start empty)")
    p.add_argument("--workers", type=int, default=-1,
                   help="MTASIDECAR_INGEST_WORKERS (default -1: one per core)")
    p.add_argument("--dns-timeout", type=float, default=2.0, help="MTASIDECAR_DNS_TIMEOUT (default 2)")
    p.add_argument("--dns-budget", type=float, default=5.0, help="MTASIDECAR_DNS_BUDGET (default 5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--size", type=int, default=10_000, help="mean message size in bytes")
    p.add_argument("--timeout", type=float, default=600, help="give up a run after this many seconds")
    p.add_argument("--quiet-wait", type=float, default=30,
                   help="before each run, wait up to this many seconds for other busy processes to calm down")
    p.add_argument("--keep", action="store_true", help="keep the temporary data directories")


# --------------------------------------------------------------------------
# Keys, zone, signed backlogs (cached under bench/results: RSA signing in
# pure-Python dkimpy costs ~6 ms a message)


def _make_keys() -> dict:
    import nacl.signing
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    ed = nacl.signing.SigningKey.generate()
    return {"rsa_private": pem.decode(), "rsa_record": "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode(),
            "ed_private": base64.b64encode(bytes(ed)).decode(),
            "ed_record": "v=DKIM1; k=ed25519; p=" + base64.b64encode(bytes(ed.verify_key)).decode()}


def domain_name(kind: str, k: int) -> str:
    return f"d{k:02d}.test" if kind == "zipf" else f"c{k:05d}.test"


def uses_ed25519(k: int) -> bool:
    return k % 5 == 4


def has_dmarc(k: int) -> bool:
    return k % 10 != 9


def uses_include(k: int) -> bool:
    return k % 2 == 1


def add_domains(zone: dict, keys: dict, kind: str, count: int) -> None:
    for j in range(INCLUDES):
        zone[f"_spf.esp{j}.test"] = {"TXT": [f"v=spf1 ip4:{CLIENT_NET} -all"]}
    for k in range(count):
        d = domain_name(kind, k)
        spf = (f"v=spf1 include:_spf.esp{k % INCLUDES}.test ~all" if uses_include(k)
               else f"v=spf1 ip4:{CLIENT_NET} -all")
        zone[d] = {"TXT": [spf], "A": ["192.0.2.1"]}
        if uses_ed25519(k):
            zone[f"ed._domainkey.{d}"] = {"TXT": [keys["ed_record"]]}
        else:
            zone[f"rsa._domainkey.{d}"] = {"TXT": [keys["rsa_record"]]}
        if has_dmarc(k):
            zone[f"_dmarc.{d}"] = {"TXT": ["v=DMARC1; p=reject; rua=mailto:dmarc@" + d]}


def lookups_needed(k: int) -> int:
    """TXT look-ups one message from domain k needs with an empty cache."""
    return 3 + (1 if uses_include(k) else 0)  # SPF (+ its include), DKIM key, _dmarc


_ANY_DKIM = re.compile(rb"^DKIM-Signature:.*\n(?:[ \t].*\n)*", re.MULTILINE | re.IGNORECASE)
_FROM = re.compile(rb"^(From: .*<[^@>]+@)[^>]+(>)$", re.MULTILINE)
_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type"]


def _sign_one(job: tuple) -> bytes:
    import dkim
    msg, domain, ed, keys = job
    end = msg.find(b"\n\n")
    head, body = msg[:end + 1], msg[end + 1:]
    head = _ANY_DKIM.sub(b"", head)  # whatever signature the corpus put there
    head, n = _FROM.subn(lambda m: m.group(1) + domain.encode() + m.group(2), head, count=1)
    if n != 1:
        raise C.BenchError("corpus message without a From: <address> line")
    msg = head + body
    if ed:
        sel, alg, key = b"ed", b"ed25519-sha256", keys["ed_private"].encode()
    else:
        sel, alg, key = b"rsa", b"rsa-sha256", keys["rsa_private"].encode()
    sig = dkim.sign(msg, sel, domain.encode(), key, signature_algorithm=alg, include_headers=_HEADERS)
    return sig.replace(b"\r\n", b"\n") + msg  # LF throughout, as Postfix writes the Maildir file


def sender_domains(kind: str, n: int, domains: int, seed: int) -> list[int]:
    """Domain index of each message: Zipf-weighted (1/rank) and seeded, or one each."""
    if kind == "distinct":
        return list(range(n))
    rng = random.Random(f"mtasidecar-bench-auth:{seed}:{domains}")
    return rng.choices(range(domains), weights=[1 / (k + 1) for k in range(domains)], k=n)


def keys_for(msgs: list[bytes]) -> dict:
    """Signing keys, kept beside the backlogs so cached backlogs stay valid."""
    path = C.RESULTS / "auth-keys.json"
    if path.exists():
        return json.loads(path.read_text())
    keys = _make_keys()
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(keys))
    os.replace(tmp, path)
    return keys


def backlog(kind: str, msgs: list[bytes], keys: dict, domains: int, seed: int) -> tuple[list[int], list[bytes]]:
    """(domain index per message, signed messages), cached under bench/results."""
    n = len(msgs)
    senders = sender_domains(kind, n, domains, seed)
    h = hashlib.sha1(keys["rsa_record"].encode())
    for m in msgs:
        h.update(m)
    path = C.RESULTS / f"auth-backlog-{kind}-n{n}-d{domains}-s{seed}-{h.hexdigest()[:10]}.bin"
    if path.exists():
        data, out, off = path.read_bytes(), [], 0
        while off < len(data):
            (ln,) = struct.unpack_from(">I", data, off)
            out.append(data[off + 4:off + 4 + ln])
            off += 4 + ln
        if len(out) == n:
            return senders, out
    t = time.perf_counter()
    jobs = [(m, domain_name(kind, k), uses_ed25519(k), keys) for m, k in zip(msgs, senders)]
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        signed = list(pool.map(_sign_one, jobs, chunksize=64))
    print(f"signed {n} messages ({kind}) in {time.perf_counter() - t:.1f} s", flush=True)
    C.RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        for m in signed:
            fh.write(struct.pack(">I", len(m)) + m)
    os.replace(tmp, path)
    return senders, signed


# --------------------------------------------------------------------------
# One run


def _settings(data_dir: Path, workers: int, checks: bool, dns: str, timeout: float, budget: float):
    """Settings of one run, whatever MTASIDECAR_* variables this process has.

    Built here (not with bench.common.settings_for) so that the DNS timeout and
    budget are this benchmark's own."""
    from mtasidecar.config import load
    return load(environ={}, overrides={
        "data_dir": str(data_dir), "hostname": "bench.localhost",
        "domains": [{"name": "bench.test", "subdomains": True}],
        "ingest": {"workers": workers}, "auth": {"enabled": checks},
        # Never a resolver outside 127.0.0.1, checks on or off.
        "dns": {"servers": [dns], "timeout": timeout, "budget": budget}})


_DKIM_COUNT = """
import json, sqlite3, sys
from mtasidecar.store import decompress
out = {}
con = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
for (doc,) in con.execute("SELECT document FROM message_body WHERE message_id > ?", (int(sys.argv[2]),)):
    for d in (json.loads(decompress(doc)).get("auth") or {}).get("dkim", []):
        out[d["result"]] = out.get(d["result"], 0) + 1
print(json.dumps(out))
"""


def _dkim_results(db: Path, after: int = 0) -> dict:
    """DKIM results over all messages, from the stored documents. Decoded in a
    fresh interpreter: the store's codec is the ingester's, not necessarily
    the one this process imported."""
    import subprocess
    out = subprocess.run([C.PY, "-c", _DKIM_COUNT, str(db), str(after)], capture_output=True, text=True, timeout=300,
                         cwd=C.ROOT)
    if out.returncode != 0:
        return {"?": 0}
    return json.loads(out.stdout)


def primer(msgs: list[bytes], senders: list[int], rounds: int = PRIME_ROUNDS) -> list[bytes]:
    """The first message of each sender domain, the whole cycle ``rounds`` times.

    With fewer domains than CHUNK (the default 50 against 64), any CHUNK
    consecutive messages of it come from every domain, so each worker process
    that prepares one chunk of it has every domain's records in its cache; the
    'DNS queries' column shows whether one missed some."""
    first: dict[int, bytes] = {}
    for m, k in zip(msgs, senders):
        first.setdefault(k, m)
    return [first[k] for k in sorted(first)] * rounds


def run_one(variant: str, msgs: list[bytes], dns, args, prime: list[bytes] | None = None) -> dict:
    """One run on a fresh data directory.

    prime None: the backlog is in new/ before the ingester starts; the clock
    runs from its spawn. Otherwise the ingester is started on an empty new/,
    ingests ``prime`` (its caches fill), and the clock starts when the backlog
    is moved into new/ (renames, as virtual(8) links files in)."""
    on, delay, _kind, _label = VARIANTS[variant]
    n = len(msgs)
    base = Path(tempfile.mkdtemp(prefix=f"bench-auth-{variant}-", dir="/tmp"))
    proc = sampler = None
    try:
        settings = _settings(base, args.workers, on, f"127.0.0.1:{dns.port}", args.dns_timeout, args.dns_budget)
        maildir = settings.maildir_path
        ensure_maildir(maildir)
        stage = base / "stage"  # the same filesystem: moving a file in is a rename
        ensure_maildir(stage)
        C.write_backlog(msgs, (maildir if prime is None else stage) / "new")
        os.sync()
        busy = C.wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else []
        dns.delay = delay
        dns.queries.clear()
        db, log = base / "mtasidecar.db", base / "ingest.log"
        t0 = time.monotonic()
        proc = C.start_process([C.PY, "-m", "mtasidecar", "ingest"], env=C.child_env(settings), log=log)
        sampler = C.TreeSampler(proc.pid, 0.1).start()
        before, cpu_before, queries_before = 0, 0.0, 0
        if prime is not None:
            C.write_backlog(prime, maildir / "new")
            before = len(prime)
            C.wait_until(lambda: C.max_message_id(db) >= before and C.count_files(maildir / "new") == 0,
                         args.timeout, 0.02, "the primer to be stored", alive=lambda: proc.poll() is None)
            sampler.sample()
            cpu_before, queries_before = sampler.cpu_total(), len(dns.queries)
            t0 = time.monotonic()
            for name in os.listdir(stage / "new"):
                os.rename(stage / "new" / name, maildir / "new" / name)
        t_first, _t_rows, t_done = C.wait_ingested(db, maildir / "new", n, proc, t0 + args.timeout,
                                                   after=before, log=log, what=variant)
        sampler.stop()
        queries = len(dns.queries) - queries_before
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        where = f"WHERE id > {before}"  # the backlog's rows, not the primer's
        count = con.execute(f"SELECT count(*) FROM message {where}").fetchone()[0]
        spf = dict(con.execute(f"SELECT coalesce(spf, '-'), count(*) FROM message {where} GROUP BY 1").fetchall())
        dmarc = dict(con.execute(
            f"SELECT coalesce(dmarc, '-'), count(*) FROM message {where} GROUP BY 1").fetchall())
        authed = con.execute(f"SELECT count(*) FROM message {where} AND authenticated").fetchone()[0]
        con.close()
        dkim = _dkim_results(db, before) if on else {}
        log_text = log.read_text(errors="replace") if log.exists() else ""
        errors = [line for line in log_text.splitlines() if " ERROR " in line or line.startswith("Traceback")]
        started = re.search(r"(\d+) worker processes", log_text)  # the ingester's own start-up line
        total, drain = t_done - t0, t_done - t_first
        return {"variant": variant, "n": n, "count": count, "total_s": total, "startup_s": t_first - t0,
                "rate": n / total, "rate_drain": n / drain, "cpu_s": sampler.cpu_total() - cpu_before,
                "queries": queries, "primed": len(prime) if prime is not None else 0,
                "spf": spf, "dmarc": dmarc, "dkim": dkim, "authenticated": authed, "busy": busy,
                "errors": errors, "workers": int(started.group(1)) if started else None}
    finally:
        dns.delay = 0
        if sampler is not None and not sampler._stop.is_set():
            sampler.stop()
        C.stop_process(proc)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def _fmt(counts: dict) -> str:
    return " ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


def _median_run(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda x: x["rate"])
    return dict(ordered[len(ordered) // 2], all_rates=[x["rate"] for x in runs])


def run(args, argv: list[str]) -> C.Report:
    _tests_importable()
    from tests.dnsserver import DNSTestServer

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise C.BenchError(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    report = C.Report("auth", argv, C.machine_info())
    corpus = C.corpus(args.n, seed=args.seed, size=args.size)
    keys = keys_for(corpus)
    kinds = {VARIANTS[v][2] for v in variants}
    backlogs = {kind: backlog(kind, corpus, keys, args.domains, args.seed) for kind in sorted(kinds)}
    zone: dict = {}
    add_domains(zone, keys, "zipf", args.domains)
    if "distinct" in kinds:
        add_domains(zone, keys, "distinct", args.n)
    needed = {kind: sum(lookups_needed(k) for k in senders) for kind, (senders, _m) in backlogs.items()}
    mean = sum(map(len, next(iter(backlogs.values()))[1])) / args.n
    print(f"backlog: {args.n} signed messages, mean {mean:.0f} bytes", flush=True)

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with DNSTestServer(zone) as dns:
        for r in range(args.repeat):  # rounds interleave the variants: a busy spell hits all of them
            for v in variants:
                print(f"round {r + 1}/{args.repeat}: {v} ({VARIANTS[v][3]})...", flush=True)
                senders, msgs = backlogs[VARIANTS[v][2]]
                prime = primer(msgs, senders) if args.start == "running" and v in PRIMED else None
                res = run_one(v, msgs, dns, args, prime)
                print(f"  {res['rate']:.0f} msg/s overall, {res['rate_drain']:.0f} drain, "
                      f"{res['queries']} DNS queries, dmarc {_fmt(res['dmarc'])}", flush=True)
                for line in res["errors"][:3]:
                    print(f"  ingest log: {line}", flush=True)
                runs[v].append(res)
    results = {v: _median_run(rs) for v, rs in runs.items()}

    t = C.Table(["variant", "setup", "start", "messages", "total s", "msg/s (total)", "msg/s (drain)", "CPU ms/msg",
                 "DNS queries", "look-ups from cache", "SPF", "DKIM", "DMARC", "authenticated"],
                title=f"Ingest of a {args.n}-message DKIM-signed backlog (mean {mean:.0f} bytes); "
                      f"median of {args.repeat} run(s), all runs in brackets")
    for v, r in results.items():
        on, _delay, kind, label = VARIANTS[v]
        cached = f"{100 * (1 - r['queries'] / needed[kind]):.1f} %" if on else "-"
        rates = r["all_rates"]
        rate = f"{r['rate']:.0f}" + (f" ({', '.join(f'{x:.0f}' for x in rates)})" if len(rates) > 1 else "")
        start = f"running, primed ({r['primed']} msgs)" if r["primed"] else "spawn"
        t.add(v, label, start, r["count"], f"{r['total_s']:.1f}", rate, f"{r['rate_drain']:.0f}",
              f"{r['cpu_s'] / r['n'] * 1000:.2f}", r["queries"] if on else "-", cached,
              _fmt(r["spf"]), _fmt(r["dkim"]), _fmt(r["dmarc"]), r["authenticated"])
    report.tables.append(t)

    t2 = C.Table(["target", "ratio of medians", "per round", "met?", "CPU ms/msg ratio (den / num)"],
                 title="Targets (msg/s over the whole run)")

    def ratio_row(label: str, num: str, den: str, target: float | None, cpu: bool) -> None:
        if num in results and den in results:
            ratio = results[num]["rate"] / results[den]["rate"]
            rounds = ", ".join(f"{100 * a['rate'] / b['rate']:.0f} %" for a, b in zip(runs[num], runs[den]))
            # What the ratio would be if the ingester were CPU-bound: robust on a busy machine.
            cpu_ratio = (statistics.median(r["cpu_s"] for r in runs[den])
                         / statistics.median(r["cpu_s"] for r in runs[num]))
            t2.add(label, f"{100 * ratio:.0f} %", rounds, C.yes(ratio >= target) if target else "-",
                   f"{100 * cpu_ratio:.0f} %" if cpu else "-")
    ratio_row("warm ≥ 80 % of off", "warm", "off", TARGET_WARM, True)
    ratio_row("slow ≥ 50 % of warm", "slow", "warm", TARGET_SLOW, False)  # the difference is waiting
    ratio_row("(info) cold / warm", "cold", "warm", None, False)
    report.tables.append(t2)

    zipf_senders = backlogs["zipf"][0] if "zipf" in backlogs else sender_domains("zipf", args.n, args.domains,
                                                                                   args.seed)
    seen = sorted({str(r["workers"]) for rs in runs.values() for r in rs})
    workers = "/".join(seen) + (f" (--workers {args.workers})" if args.workers >= 0 else
                                " (the ingester's default for --workers -1)")
    report.notes.append(
        f"Each run: fresh data directory; `python -m mtasidecar ingest` with {workers} worker processes, DNS "
        f"timeout {args.dns_timeout} s, budget {args.dns_budget} s; the backlog's {args.n} files carry Postfix "
        "trace headers and LF line ends, and are written and synced before the clock starts. 'spawn': the "
        "files are in new/ when the ingester starts; the clock runs from its spawn (interpreter start "
        "included). 'running, primed': the ingester first stores the primer (each sender domain's first "
        f"message, {PRIME_ROUNDS} times over), then the clock starts and the files are renamed into new/. "
        "Either way the clock stops when the database holds the backlog's N rows and new/ is empty; "
        "'drain' starts at the backlog's first committed row.")
    report.notes.append(
        f"Senders (off/warm/slow): {args.domains} domains, Zipf-weighted (the top one sends "
        f"{100 * zipf_senders.count(0) / len(zipf_senders):.0f} %, {len(set(zipf_senders))} send at least "
        "one message); every fifth signs with Ed25519, the rest RSA-2048; half the SPF records use an "
        "include:; every tenth domain has no DMARC record. 'cold': the same messages, each From a domain of "
        f"its own with the same kinds of records. Without a cache a message needs "
        f"{needed.get('zipf', needed.get('distinct', 0)) / args.n:.1f} TXT look-ups on average.")
    report.notes.append(
        "'look-ups from cache' = 1 − queries the DNS server saw while the clock ran / look-ups the backlog "
        "needs without any cache. The cache is per process (the ingester and each worker) and starts empty "
        "with it: from spawn the misses are the first message of each domain in each process.")
    report.notes.append(
        "CPU ms/msg: user+system time of the whole ingester tree (main process, forkserver and workers) per "
        "message, while the clock ran. "
        "On a machine shared with other work the wall-clock rates wander; the CPU-time ratio of warm and "
        "off is what warm/off would be with the ingester CPU-bound (as it is on a backlog).")
    report.notes.append(
        "The DNS server (dnslib, one thread per query) runs inside the benchmark process on the same "
        "machine; in 'cold' its CPU (~0.3 ms a query) competes with the ingester.")
    failed = [f"{v} round {i + 1}" for v, rs in runs.items() for i, r in enumerate(rs) if r["errors"]]
    if failed:
        report.notes.append("The ingest log had errors (e.g. a worker failed and its files were prepared "
                            "inline) in: " + ", ".join(failed) + "; those runs are not comparable.")
    busy = sorted({b.split("[")[0] for rs in runs.values() for r in rs for b in r["busy"]})
    if busy:
        report.notes.append("Other processes still busy at the start of some runs (after waiting up to "
                            f"{args.quiet_wait:.0f} s): " + ", ".join(busy) + "; the machine is shared.")
    return report


def _tests_importable() -> None:
    """tests/dnsserver.py is imported from the repository root, wherever we run from."""
    root = str(C.ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.auth` is `python -m bench auth`: one entry point runs and records."""
    from .__main__ import main as bench_main
    return bench_main(["auth"] + (sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
