"""`python -m bench sender`: the SMTP clients alone, against Postfix's smtp-sink.

smtp-sink accepts and discards mail as fast as it can, so what is measured
here is the client's ceiling: bench.smtp (Python, pipelined) and Postfix's
smtp-source (C, not pipelined), same corpus mail size, same number of
connections. A client well above the rate Postfix reaches (~950 msg/s on 2
cores) does not limit the SMTP benchmarks.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from . import common as C
from .smtp import Mail, send_parallel, to_wire


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--conns", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quiet-wait", type=float, default=60)


def mails_for(msgs: list[bytes]) -> list[Mail]:
    return [Mail(C.sender_of(m), C.recipient_of(m), to_wire(m), key=i) for i, m in enumerate(msgs)]


def start_sink(port: int, log: Path):
    sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    proc = C.start_process([sink, "-u", "nobody", f"127.0.0.1:{port}", "256"], log=log)
    C.wait_until(lambda: _port_open(port), 10, 0.05, "smtp-sink", alive=lambda: proc.poll() is None)
    return proc


def _port_open(port: int) -> bool:
    import socket
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def run_smtp_source(port: int, n: int, conns: int, msg: bytes, to: str, tmp: Path) -> tuple[float, float]:
    """(seconds, CPU seconds of smtp-source) for n copies of msg over conns sessions."""
    f = tmp / "message.eml"
    f.write_bytes(msg)
    argv = [shutil.which("smtp-source") or "/usr/sbin/smtp-source", "-d", "-s", str(conns), "-m", str(n),
            "-F", str(f), "-f", "sender@example.org", "-t", to, f"127.0.0.1:{port}"]
    t0 = time.monotonic()
    import resource
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, check=True, timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.monotonic() - t0, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def run(args, argv: list[str]) -> C.Report:
    report = C.Report("sender", argv, C.machine_info())
    msgs = C.corpus(args.n, seed=args.seed)
    mails = mails_for(msgs)
    busy = C.wait_quiet(args.quiet_wait)
    tmp = Path(tempfile.mkdtemp(prefix="bench-sender-", dir="/tmp"))
    port = C.free_port()
    sink = None
    try:
        sink = start_sink(port, tmp / "sink.log")
        sampler = C.TreeSampler(sink.pid, 0.5).start()
        t_cpu = time.process_time()
        res = send_parallel("127.0.0.1", port, mails, args.conns)
        py_cpu = time.process_time() - t_cpu
        if res.errors:
            raise C.BenchError(f"python sender: {res.errors[:3]}")
        secs, src_cpu = run_smtp_source(port, args.n, args.conns, msgs[0], "box00000@bench.test", tmp)
        sampler.stop()
    finally:
        C.stop_process(sink)
        shutil.rmtree(tmp, ignore_errors=True)
    mean = sum(map(len, msgs)) / len(msgs)
    t = C.Table(["client", "messages", "connections", "msg/s", "client CPU ms/msg"],
                title=f"SMTP clients against smtp-sink (mean message {mean:.0f} bytes)")
    t.add("bench.smtp (Python, PIPELINING)", len(res.replies), args.conns, f"{res.rate:.0f}",
          f"{py_cpu / args.n * 1000:.3f}")
    t.add("smtp-source -d (C)", args.n, args.conns, f"{args.n / secs:.0f}", f"{src_cpu / args.n * 1000:.3f}")
    report.tables.append(t)
    report.notes.append("smtp-source sends one file again and again (the first corpus mail, "
                        f"{len(msgs[0])} bytes); bench.smtp sends the whole corpus.")
    if busy:
        report.notes.append("Other processes busy on the machine at the start: " + ", ".join(busy))
    return report
