"""`python -m bench.policy`: Postfix policy service latency and throughput.

`python -m mtasidecar policy` runs as its own process (as in production) on a
fresh SQLite database holding --mailboxes live mailboxes (each with a token,
as POST /api/v1/mailboxes makes them) on the private domain priv.bench, plus a
public domain pub.bench. A client in this process speaks the policy delegation
protocol as Postfix's smtpd does: --connections persistent connections, one
request at a time on each, every request a full RCPT-state attribute set
(~30 attributes, ~700 bytes).

Traffic mix (seeded): 70 % live private mailboxes, 10 % unknown private
addresses (→ 550), 10 % public-domain addresses, 5 % foreign domains, 5 %
from one heavy client IP that goes over the default rate (→ 450); one message
in ten has a second recipient. The other clients come from 4,096 addresses.

Phases:

  steady  an open-loop schedule of --rate checks/s for --duration s, spread
          over the connections (request k at t0 + k/rate on connection
          k mod N). Latency is write → answer on the client; "late" is how
          far the client itself sent behind schedule (client jitter, not the
          service's latency).
  max     closed loop: every connection sends its next request as soon as
          the answer arrives, for --max-duration s: the most checks/s this
          client gets out of the service (both share the machine's cores).
  inproc  Policy.check called in this process on the same database: the cost
          of one decision on the event-loop thread versus with a hop to a
          worker thread (why the service looks up synchronously).

Target: p99 ≤ 2 ms at 500 checks/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import common as C

TARGET_P99_MS = 2.0
PRIVATE, PUBLIC = "priv.bench", "pub.bench"
HEAVY_IP = "203.0.113.66"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=500.0, help="checks/s in the steady phase (default 500)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of the steady phase (default 20)")
    p.add_argument("--connections", type=int, default=20,
                   help="persistent connections, like as many smtpd processes (default 20)")
    p.add_argument("--mailboxes", type=int, default=10_000, help="live mailboxes in the database (default 10000)")
    p.add_argument("--max-duration", type=float, default=5.0, help="seconds of the closed-loop phase (default 5)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--nice", type=int, default=0,
                   help="run the service and this client at this nice value (e.g. -10, as root): on a "
                        "machine shared with other work, measures the service rather than the neighbours")
    p.add_argument("--realtime", action="store_true",
                   help="steady phase only: service and client under SCHED_RR (as root), so that "
                        "other work on a shared machine cannot delay them; the closed-loop phase "
                        "runs at normal priority again")
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="wait up to this many seconds for other processes to go quiet first (default 30)")


# -- the database and the requests -------------------------------------------------


def make_database(settings, n: int, rng: random.Random) -> list[str]:
    """The schema, both domains, ``n`` live mailboxes (and n/20 expired ones); their addresses."""
    from mtasidecar.store import Store
    from mtasidecar.store.models import Domain, Mailbox, Token

    store = Store(settings.database_url)
    store.setup()
    store.sync_domains([(d.name, d.subdomains, d.mode) for d in settings.domains])
    now = time.time()
    domain_id = Domain.get(Domain.name == PRIVATE).id
    live = [f"{_random_local(rng)}@{PRIVATE}" for _ in range(n)]
    expired = [f"{_random_local(rng)}@{PRIVATE}" for _ in range(n // 20)]
    with store.db.atomic():
        for chunk_start in range(0, len(live) + len(expired), 500):
            rows = []
            for i in range(chunk_start, min(chunk_start + 500, len(live) + len(expired))):
                address = live[i] if i < len(live) else expired[i - len(live)]
                rows.append({"address": address, "domain": domain_id, "created_at": now,
                             "expires_at": now + 3600 if i < len(live) else now - 60})
            Mailbox.insert_many(rows).execute()
        ids = [i for (i,) in Mailbox.select(Mailbox.id).tuples()]
        for chunk_start in range(0, len(ids), 500):
            Token.insert_many([{"token_hash": secrets.token_hex(32), "mailbox": i, "created_at": now}
                               for i in ids[chunk_start:chunk_start + 500]]).execute()
    store.close()
    return live


def _random_local(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(12))


def request_bytes(recipient: str, instance: str, client: str, count: int) -> bytes:
    attrs = {
        "request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
        "helo_name": "mail.sender.example", "queue_id": "", "sender": "bounce-123@sender.example",
        "recipient": recipient, "recipient_count": str(count), "client_address": client,
        "client_name": "mail.sender.example", "client_port": "51234", "reverse_client_name": "mail.sender.example",
        "instance": instance, "sasl_method": "", "sasl_username": "", "sasl_sender": "", "size": "12345",
        "ccert_subject": "", "ccert_issuer": "", "ccert_fingerprint": "", "ccert_pubkey_fingerprint": "",
        "encryption_protocol": "TLSv1.3", "encryption_cipher": "TLS_AES_256_GCM_SHA384",
        "encryption_keysize": "256", "etrn_domain": "", "stress": "", "server_address": "127.0.0.1",
        "server_port": "25", "policy_context": "", "compatibility_level": "3.6", "mail_version": "3.7.11",
    }
    return "".join(f"{k}={v}\n" for k, v in attrs.items()).encode() + b"\n"


def make_requests(n: int, live: list[str], rng: random.Random) -> list[bytes]:
    out: list[bytes] = []
    message = 0
    while len(out) < n:
        message += 1
        instance = f"{message:x}.{rng.getrandbits(32):08x}.0"
        r = rng.random()
        if r < 0.05:
            client = HEAVY_IP
        else:
            client = f"198.{18 + rng.getrandbits(1)}.{rng.getrandbits(8)}.{rng.getrandbits(3) + 1}"
        for count in range(2 if rng.random() < 0.1 else 1):
            r = rng.random()
            if r < 0.70:
                to = rng.choice(live)
            elif r < 0.80:
                to = f"{_random_local(rng)}@{PRIVATE}"
            elif r < 0.90:
                to = f"{_random_local(rng)}@{PUBLIC}"
            else:
                to = f"{_random_local(rng)}@elsewhere.example"
            out.append(request_bytes(to, instance, client, count))
    return out[:n]


# -- the client ----------------------------------------------------------------------


async def _open(port: int):
    return await asyncio.open_connection("127.0.0.1", port)


async def _ask(reader, writer, data: bytes) -> bytes:
    writer.write(data)
    return await reader.readuntil(b"\n\n")


def _kind(answer: bytes) -> str:
    action = answer[len(b"action="):].strip().split(b" ", 1)[0].decode()
    return action if action in ("DUNNO", "550", "552", "450", "452") else "other"


async def steady(port: int, requests: list[bytes], rate: float, connections: int) -> dict:
    conns = [await _open(port) for _ in range(connections)]
    latencies: list[float] = []
    late: list[float] = []
    kinds: dict[str, int] = {}
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.2
    last = [t0]

    async def worker(c: int) -> None:
        reader, writer = conns[c]
        for k in range(c, len(requests), connections):
            due = t0 + k / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()
            late.append(max(0.0, loop.time() - due))
            answer = await _ask(reader, writer, requests[k])
            latencies.append(time.perf_counter() - sent)
            kinds[_kind(answer)] = kinds.get(_kind(answer), 0) + 1
            last[0] = max(last[0], loop.time())

    await asyncio.gather(*(worker(c) for c in range(connections)))
    for _r, w in conns:
        w.close()
    return {"latencies": latencies, "late": late, "kinds": kinds, "elapsed": last[0] - t0}


async def closed_loop(port: int, requests: list[bytes], duration: float, connections: int) -> dict:
    conns = [await _open(port) for _ in range(connections)]
    done = [0]
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + duration

    async def worker(c: int) -> None:
        reader, writer = conns[c]
        k = c
        while loop.time() < end:
            sent = time.perf_counter()
            await _ask(reader, writer, requests[k % len(requests)])
            latencies.append(time.perf_counter() - sent)
            done[0] += 1
            k += connections

    await asyncio.gather(*(worker(c) for c in range(connections)))
    elapsed = loop.time() - start
    for _r, w in conns:
        w.close()
    return {"count": done[0], "elapsed": elapsed, "latencies": latencies}


def in_process(settings, requests: list[bytes], n: int = 5000) -> dict:
    """One decision on the loop thread vs. with a hop to a worker thread (µs)."""
    from mtasidecar import policy as P
    from mtasidecar.store import Store

    store = Store(settings.database_url)
    pol = P.Policy.from_settings(P._open_db(store), settings, max_entries=10 ** 9)
    parsed = []
    for data in requests[:n]:
        attrs = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
        parsed.append(attrs)

    def fresh(i: int, tag: str) -> dict:
        a = dict(parsed[i % len(parsed)])
        a["instance"] = f"{tag}{i}"
        a["client_address"] = f"10.{i % 250}.{i // 250 % 250}.1"  # keep the rate out of the way
        return a

    sync_us = []
    for i in range(n):
        a = fresh(i, "s")
        t = time.perf_counter()
        pol.check(a)
        sync_us.append((time.perf_counter() - t) * 1e6)

    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(1)
    pool.submit(lambda: P._open_db(store)).result()  # the worker thread's own connection

    async def hops() -> list[float]:
        loop = asyncio.get_running_loop()
        out = []
        for i in range(n):
            a = fresh(i, "t")
            t = time.perf_counter()
            await loop.run_in_executor(pool, pol.check, a)
            out.append((time.perf_counter() - t) * 1e6)
        return out

    thread_us = asyncio.run(hops())
    pool.shutdown()
    store.close()
    return {"sync": sync_us, "thread": thread_us}


# -- the run -------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(values: list[float], q: float) -> str:
    return f"{C.pct(values, q) * 1000:.2f}"


def run(args, argv: list[str]) -> C.Report:
    from mtasidecar.config import load

    rng = random.Random(args.seed)
    report = C.Report("policy", argv, C.machine_info())
    base = Path(tempfile.mkdtemp(prefix="bench-policy-", dir="/tmp"))
    proc = None
    try:
        port = C.free_port()
        settings = load(environ={}, overrides={
            "data_dir": str(base), "hostname": "bench.localhost",
            "domains": [{"name": PRIVATE, "subdomains": False, "mode": "private"},
                        {"name": PUBLIC, "subdomains": True, "mode": "public"}],
            "policy": {"listen": f"127.0.0.1:{port}", "socketmap": ""},
        })
        print(f"database: {args.mailboxes} mailboxes ...", flush=True)
        live = make_database(settings, args.mailboxes, rng)
        total = int(args.rate * args.duration)
        requests = make_requests(total, live, rng)

        proc = C.start_process([C.PY, "-m", "mtasidecar", "policy"], env=C.child_env(settings),
                               log=base / "policy.log", cwd=C.ROOT)
        C.wait_until(lambda: _connects(port), 30, what="the policy service", alive=lambda: proc.poll() is None)
        if args.nice:
            for pid in (proc.pid, os.getpid()):
                os.setpriority(os.PRIO_PROCESS, pid, args.nice)
            report.notes.append(f"Service and client ran at nice {args.nice} (--nice); other processes at their own.")
        busy = C.wait_quiet(args.quiet_wait) if args.quiet_wait > 0 else []

        print(f"steady: {args.rate:g} checks/s for {args.duration:g} s over {args.connections} connections ...",
              flush=True)
        cpu0 = _cpu_seconds(proc.pid)
        with _realtime([proc.pid, os.getpid()], args.realtime):
            s = asyncio.run(steady(port, requests, args.rate, args.connections))
        cpu_steady = _cpu_seconds(proc.pid) - cpu0
        busy_after = C.busy_others(exclude={proc.pid}, threshold=25.0)
        if args.realtime:
            report.notes.append("Steady phase with service and client under SCHED_RR (--realtime): the "
                                "latency of the service itself, not of the queue for a shared CPU.")

        print(f"max: closed loop for {args.max_duration:g} s ...", flush=True)
        cpu0 = _cpu_seconds(proc.pid)
        m = asyncio.run(closed_loop(port, requests, args.max_duration, args.connections))
        cpu_max = _cpu_seconds(proc.pid) - cpu0
        C.stop_process(proc)
        if proc.returncode != 0:
            raise C.BenchError(f"the policy service exited with {proc.returncode}; see {base / 'policy.log'}")
        proc = None

        print("inproc: decision cost on the loop thread vs. a worker thread ...", flush=True)
        ip = in_process(settings, requests)

        lat = s["latencies"]
        p99 = C.pct(lat, 99) * 1000
        t = C.Table(["phase", "checks", "checks/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms",
                     "service CPU %", f"p99 ≤ {TARGET_P99_MS:g} ms"],
                    title="Policy checks over persistent connections (latency: write → answer)")
        t.add(f"steady {args.rate:g}/s", len(lat), f"{len(lat) / s['elapsed']:.0f}", _ms(lat, 50), _ms(lat, 90),
              _ms(lat, 99), _ms(lat, 99.9), f"{max(lat) * 1000:.2f}",
              f"{cpu_steady / s['elapsed'] * 100:.0f}", C.yes(p99 <= TARGET_P99_MS))
        ml = m["latencies"]
        t.add("max (closed loop)", m["count"], f"{m['count'] / m['elapsed']:.0f}", _ms(ml, 50), _ms(ml, 90),
              _ms(ml, 99), _ms(ml, 99.9), f"{max(ml) * 1000:.2f}", f"{cpu_max / m['elapsed'] * 100:.0f}", "")
        report.tables.append(t)

        k = C.Table(["answer", "count", "share"], title="Answers in the steady phase")
        for kind, count in sorted(s["kinds"].items(), key=lambda kv: -kv[1]):
            k.add(kind, count, f"{count / len(lat) * 100:.1f} %")
        report.tables.append(k)

        d = C.Table(["where the decision runs", "mean µs", "p50 µs", "p99 µs"],
                    title="One decision in process (Policy.check, same database)")
        for name, key in (("event-loop thread (chosen)", "sync"), ("hop to a worker thread", "thread")):
            v = ip[key]
            d.add(name, f"{sum(v) / len(v):.0f}", f"{C.pct(v, 50):.0f}", f"{C.pct(v, 99):.0f}")
        report.tables.append(d)

        late = s["late"]
        report.notes.append(f"{args.mailboxes} live mailboxes (+{args.mailboxes // 20} expired) in SQLite (WAL); "
                            f"{args.connections} connections; requests ~{len(requests[0])} bytes.")
        report.notes.append(f"Client send lateness (its own scheduling, not counted above): p50 "
                            f"{_ms(late, 50)} ms, p99 {_ms(late, 99)} ms.")
        report.notes.append("The closed-loop client is Python on the same cores: 'max' is a lower bound "
                            "of what the service can answer.")
        if busy or busy_after:
            report.notes.append("Other processes were busy during the run (figures not comparable): "
                                + ", ".join(sorted(set(busy + busy_after))))
        return report
    finally:
        C.stop_process(proc)
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def _realtime(pids: list[int], on: bool):
    if not on:
        yield
        return
    try:
        for pid in pids:
            os.sched_setscheduler(pid, os.SCHED_RR, os.sched_param(1))
    except PermissionError:
        raise C.BenchError("--realtime needs root (SCHED_RR)") from None
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))


def _connects(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.policy` is `python -m bench policy`: one entry point runs and records."""
    from .__main__ import main as bench_main
    return bench_main(["policy"] + (sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
