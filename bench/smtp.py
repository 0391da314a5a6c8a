"""A fast SMTP sender for the benchmarks: raw sockets, PIPELINING, one thread per connection.

smtplib costs a lot of Python per message (it re-scans and re-encodes the
data, one send per command). Here each message is prepared once (CRLF line
endings, dot-stuffed, terminated), and a transaction is two writes and two
reads: ``MAIL FROM``, ``RCPT TO`` and ``DATA`` pipelined (RFC 2920), then the
body. The time of each final "250" reply is recorded.

`python -m bench sender` measures how fast this goes against Postfix's own
smtp-sink, to know that the client is not what limits a benchmark.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field


class SmtpError(RuntimeError):
    pass


def to_wire(msg: bytes) -> bytes:
    """LF or CRLF message → SMTP DATA payload (CRLF, dot-stuffed, with the final '.')."""
    lines = msg.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    out = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in lines)
    return out + b"\r\n.\r\n"


@dataclass
class Mail:
    sender: str
    recipient: str
    wire: bytes            # from to_wire()
    key: object = None     # whatever the caller wants back with the reply time


class Connection:
    def __init__(self, host: str, port: int, helo: str = "bench.localhost", timeout: float = 30):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self._expect(self._reply(), 220)
        self.sock.sendall(f"EHLO {helo}\r\n".encode())
        code, text = self._reply()
        self._expect((code, text), 250)
        self.pipelining = b"PIPELINING" in text.upper()

    def _reply(self) -> tuple[int, bytes]:
        """One (possibly multi-line) reply: (code, all text)."""
        lines = []
        while True:
            nl = self.buf.find(b"\n")
            while nl < 0:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise SmtpError("connection closed by the server")
                self.buf += chunk
                nl = self.buf.find(b"\n")
            line, self.buf = self.buf[:nl + 1], self.buf[nl + 1:]
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), b"".join(lines)

    @staticmethod
    def _expect(reply: tuple[int, bytes], code: int) -> None:
        if reply[0] != code:
            raise SmtpError(f"expected {code}, got {reply[1].decode(errors='replace').strip()}")

    def send(self, mail: Mail) -> float:
        """One transaction; returns time.monotonic() when the final 250 arrived."""
        cmds = f"MAIL FROM:<{mail.sender}>\r\nRCPT TO:<{mail.recipient}>\r\nDATA\r\n".encode()
        if self.pipelining:
            self.sock.sendall(cmds)
            self._expect(self._reply(), 250)
            self._expect(self._reply(), 250)
            self._expect(self._reply(), 354)
        else:
            for line, code in zip(cmds.split(b"\r\n")[:3], (250, 250, 354)):
                self.sock.sendall(line + b"\r\n")
                self._expect(self._reply(), code)
        self.sock.sendall(mail.wire)
        self._expect(self._reply(), 250)
        return time.monotonic()

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
            self._reply()
        except (OSError, SmtpError):
            pass
        self.sock.close()


@dataclass
class SendResult:
    t_start: float
    t_end: float
    replies: dict = field(default_factory=dict)   # key → time of the 250
    errors: list = field(default_factory=list)

    @property
    def rate(self) -> float:
        return len(self.replies) / max(1e-9, self.t_end - self.t_start)


def send_parallel(host: str, port: int, mails: list[Mail], conns: int, timeout: float = 600,
                  on_reply=None) -> SendResult:
    """Send ``mails`` over ``conns`` persistent connections (mail i on connection i % conns).

    ``on_reply(mail, t)``, if given, is called from the sending thread after each 250.
    """
    res = SendResult(time.monotonic(), 0.0)
    deadline = time.monotonic() + timeout
    lock = threading.Lock()
    ready = threading.Barrier(conns + 1)

    def worker(k: int) -> None:
        try:
            c = Connection(host, port)
        except Exception as exc:  # noqa: BLE001 - reported, not raised in a thread
            res.errors.append(f"connect: {exc}")
            ready.abort()
            return
        try:
            ready.wait(timeout=30)
            local = {}
            for m in mails[k::conns]:
                if time.monotonic() > deadline:
                    res.errors.append("deadline reached")
                    break
                t = local[m.key] = c.send(m)
                if on_reply is not None:
                    on_reply(m, t)
            with lock:
                res.replies.update(local)
        except threading.BrokenBarrierError:
            pass
        except Exception as exc:  # noqa: BLE001
            res.errors.append(f"send: {exc}")
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(conns)]
    for t in threads:
        t.start()
    try:
        ready.wait(timeout=60)  # every connection is up: the clock starts now
    except threading.BrokenBarrierError:
        pass
    res.t_start = time.monotonic()
    for t in threads:
        t.join(timeout=max(1.0, deadline - time.monotonic() + 5))
    res.t_end = max(res.replies.values(), default=time.monotonic())
    return res
