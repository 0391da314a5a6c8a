"""`python -m bench all`: every benchmark in turn, then docs/benchmarks.md and the charts in docs/img/.

Runs, one after the other, each with the options below (--quick: smaller
ones), recording each section of docs/benchmarks.md as `--record` does:

  corpus, sender, ingest-backlog (checks on; workers 0, 1, 2), auth (checks
  off, on, and on with a 200 ms DNS: the ingest with and without authentication), smtp-e2e
  (private mode, Postfix alone vs the service), latency, api-list (1M
  messages, private mode), waiters, create, compare (maildev, maildump,
  Postfix alone and us side by side; our scaling curve: see
  bench/compare.py), and any benchmark registered in bench/__main__.py
  that this list does not name, with its defaults

then draws PNG charts from compare's figures (matplotlib: `pip install
-e '.[bench]'`) and writes the "all" section: what ran, when, under which
load, and the issue's targets against the figures.

The machine is shared: before the first benchmark it waits up to
--load-wait s for the 1-minute load average to drop below --max-load, and
up to --step-load-wait s before each later one (our own previous step also
counts in the load average for a minute or two); the loads are recorded.
A benchmark that fails is reported and the others still run. `--charts-only`
redraws the charts and the "all" section from the last compare figures
(bench/results/compare-latest.json) without measuring anything.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import time
import traceback
from dataclasses import dataclass, field

from . import common as C

IMG = C.ROOT / "docs" / "img"

STEPS = [
    ("corpus", ["--n", "2000"], ["--n", "500"]),
    ("sender", ["--n", "5000", "--quiet-wait", "30"], ["--n", "1000", "--quiet-wait", "10"]),
    ("ingest-backlog", ["--n", "20000", "--quiet-wait", "60"], ["--n", "2000", "--workers", "1", "--quiet-wait", "10"]),
    ("trickle", ["--rates", "50,250", "--n", "3000", "--quiet-wait", "30"],
     ["--rates", "250", "--n", "500", "--quiet-wait", "10"]),
    ("auth", ["--n", "20000", "--variants", "off,warm,slow", "--repeat", "3", "--quiet-wait", "30"],
     ["--n", "1000", "--variants", "off,warm", "--repeat", "1", "--quiet-wait", "10"]),
    ("smtp-e2e", ["--n", "5000", "--conns", "4", "--quiet-wait", "60"],
     ["--n", "1000", "--rounds", "1", "--quiet-wait", "10"]),
    ("latency", ["--rate", "50", "--seconds", "20", "--quiet-wait", "60"],
     ["--rate", "50", "--seconds", "5", "--quiet-wait", "10"]),
    ("api-list", ["--reuse", "--quiet-wait", "60"],
     ["--reuse", "--messages", "20000", "--mailboxes", "1000", "--duration", "5", "--quiet-wait", "10"]),
    ("waiters", ["--quiet-wait", "60"],
     ["--waiters", "100", "--sse", "10", "--wakes", "10", "--sse-wakes", "5", "--filtered", "2", "--duration", "3",
      "--cpu-window", "10", "--base-window", "3", "--quiet-wait", "10"]),
    ("create", ["--quiet-wait", "60"], ["--connections", "4", "--bodies", "random", "--duration", "3",
                                        "--quiet-wait", "10"]),
    ("compare", ["--quiet-wait", "30"],
     ["--sizes", "500,1000", "--rounds", "1", "--api-sizes", "10000,20000", "--ingest-n", "1000",
      "--api-duration", "3", "--limit", "60", "--quiet-wait", "10"]),
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sizes everywhere (a smoke test, minutes)")
    p.add_argument("--only", default="", help="comma-separated benchmarks to run (default: all)")
    p.add_argument("--skip", default="", help="comma-separated benchmarks to leave out")
    p.add_argument("--max-load", type=float, default=1.5, help="1-minute load average to wait for")
    p.add_argument("--load-wait", type=float, default=1200,
                   help="seconds to wait for it before the first benchmark (default 1200)")
    p.add_argument("--step-load-wait", type=float, default=180,
                   help="seconds to wait for it before each later benchmark (default 180)")
    p.add_argument("--charts-only", action="store_true",
                   help="only redraw the charts and the 'all' section from the last compare figures")
    p.add_argument("--compare-args", default="", help="extra options for compare, e.g. \"--rounds 3,2,1\"")


@dataclass
class AllReport(C.Report):
    images: list[tuple[str, str]] = field(default_factory=list)   # (alt text, path relative to docs/)

    def markdown(self) -> str:
        text = super().markdown()
        if self.images:
            text = text.rstrip() + "\n\n" + "\n\n".join(f"![{alt}]({path})" for alt, path in self.images) + "\n"
        return text


def _run_step(name: str, argv: list[str]):
    from .__main__ import BENCHES
    module = importlib.import_module(f".{BENCHES[name]}", __package__)
    parser = argparse.ArgumentParser(prog=f"python -m bench {name}")
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    return module.run(args, [name] + argv)


def run(args, argv: list[str]) -> C.Report:
    report = AllReport("all", argv, C.machine_info())
    steps_table = C.Table(["benchmark", "command", "1-min load before (waited s)", "minutes", "result"],
                          title="What ran")
    data = None
    if not args.charts_only:
        only = {s for s in args.only.split(",") if s}
        skip = {s for s in args.skip.split(",") if s}
        first = True
        from .__main__ import BENCHES
        listed = {name for name, _, _ in STEPS}
        # A benchmark registered after this list was written runs too, with its defaults.
        steps = [st for st in STEPS if st[0] in BENCHES] + [(name, [], []) for name in BENCHES
                                                            if name not in listed and name != "all"]
        for name, full, quick in steps:
            if (only and name not in only) or name in skip:
                continue
            argv_step = list(quick if args.quick else full)
            if name == "compare":
                argv_step += args.compare_args.split() if args.compare_args else []
                argv_step += ["--max-load", str(args.max_load), "--load-wait", "0"]
            load, waited = C.wait_load(args.max_load, args.load_wait if first else args.step_load_wait)
            first = False
            cmd = "python -m bench " + " ".join([name] + argv_step)
            print(f"\n=== {cmd} (1-minute load {load:.2f})", flush=True)
            t0 = time.monotonic()
            try:
                sub = _run_step(name, argv_step)
            except Exception as exc:  # noqa: BLE001 - one failure must not stop the others
                traceback.print_exc()
                steps_table.add(name, f"`{cmd}`", f"{load:.2f} ({waited:.0f})",
                                f"{(time.monotonic() - t0) / 60:.1f}", f"**failed**: {str(exc)[:160]}")
                continue
            print(sub.text(), flush=True)
            C.record(sub)
            steps_table.add(name, f"`{cmd}`", f"{load:.2f} ({waited:.0f})", f"{(time.monotonic() - t0) / 60:.1f}",
                            "recorded")
            if name == "compare":
                data = getattr(sub, "data", None)
        report.tables.append(steps_table)
        (C.RESULTS / "all-steps.json").write_text(json.dumps({"argv": argv, "machine": report.machine,
                                                               "rows": steps_table.rows}))
    else:
        # Redrawing only: keep what the last full run recorded about its steps.
        with contextlib.suppress(OSError, ValueError, KeyError):
            last = json.loads((C.RESULTS / "all-steps.json").read_text())
            report.argv, report.machine = last["argv"], last["machine"]
            steps_table.rows = last["rows"]
            report.tables.append(steps_table)
    if data is None:
        path = C.RESULTS / "compare-latest.json"
        if path.exists():
            data = json.loads(path.read_text())
    if data:
        from .compare import evaluate_targets
        t = C.Table(["target (issue 7)", "measured", "met?"],
                    title=f"Targets, from compare (run {data.get('started', '?')}, 1-minute load "
                          f"{data.get('start_load', '?')} at its start)")
        for row in evaluate_targets(data):
            t.add(*row)
        report.tables.append(t)
        try:
            report.images = charts(data)
        except ImportError:
            report.notes.append("Charts skipped: matplotlib is not installed (`pip install -e '.[bench]'`).")
    report.notes.append("Each benchmark's own section below has its command, the machine, the date and its "
                        "load average; figures from a loaded machine are pessimistic: compare ratios measured "
                        "in the same run.")
    C.record(report)  # the "all" section, with or without --record
    return report


# --------------------------------------------------------------------------
# Charts

COLORS = {"postfix": "#9e9e9e", "Postfix": "#c7c7c7", "mtasidecar": "#1f77b4", "maildev": "#ff7f0e",
          "maildump": "#2ca02c"}


def _median(runs):
    import statistics
    rates = [r["rate"] for r in runs if r.get("rate")]
    return statistics.median(rates) if rates else 0.0


def charts(data: dict) -> list[tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    out: list[tuple[str, str]] = []
    stamp = f"{data.get('started', '')[:16].replace('T', ' ')} UTC, {data['machine'].get('nproc')} cores, " \
            f"load {data.get('start_load', '?')}"

    def save(fig, name: str, alt: str) -> None:
        fig.text(0.99, 0.01, stamp, ha="right", va="bottom", fontsize=7, color="#777")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(IMG / name, dpi=110)
        plt.close(fig)
        out.append((alt, f"img/{name}"))

    systems = data["systems"]
    e2e = data.get("e2e", {})
    if e2e:
        sizes = sorted(e2e, key=int)
        fig, ax = plt.subplots(figsize=(8, 4.2))
        w = 0.8 / max(1, len(systems))
        for j, s in enumerate(systems):
            xs, ys, cut = [], [], []
            for i, n in enumerate(sizes):
                runs = e2e[n].get(s, [])
                if runs:
                    xs.append(i + (j - (len(systems) - 1) / 2) * w)
                    ys.append(_median(runs))
                    cut.append(any(r["cut"] for r in runs))
            bars = ax.bar(xs, ys, w, label=s, color=COLORS.get(s))
            for b, c, y in zip(bars, cut, ys):
                if c:
                    b.set_hatch("//")
                ax.annotate(f"{y:.0f}" + ("*" if c else ""), (b.get_x() + b.get_width() / 2, y),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(sizes)), [f"{int(n):,} mails" for n in sizes])
        ax.set_ylim(top=ax.get_ylim()[1] * 1.25)
        ax.set_ylabel("msg/s, SMTP 250 → visible in the API (median)")
        ax.set_title(f"End to end, {data['conns']} SMTP connections (* = cut at {data['limit']:.0f} s)")
        ax.legend(fontsize=8, ncol=len(systems), loc="upper center")
        save(fig, "compare-e2e.png", "End-to-end msg/s by system and size")

        n = "5000" if "5000" in e2e else sizes[-1]
        fig, ax = plt.subplots(figsize=(8, 4))
        qs = ["p50", "p95", "p99"]
        w = 0.8 / len(qs)
        present = [s for s in systems if e2e[n].get(s)]
        for j, q in enumerate(qs):
            ys = [e2e[n][s][-1]["latency_ms"].get(q, 0) for s in present]
            ax.bar([i + (j - 1) * w for i in range(len(present))], ys, w, label=q,
                   color=["#c6dbef", "#6baed6", "#08519c"][j])
        ax.set_xticks(range(len(present)), present)
        ax.set_yscale("log")
        ax.set_ylabel("ms, SMTP 250 → visible (log)")
        ax.set_title(f"250 → visible, {int(n):,} mails (polled every {data['poll_interval'] * 1000:.0f} ms; "
                     "Postfix: inotify)")
        ax.legend(fontsize=8)
        save(fig, "compare-latency.png", "250 to visible latency percentiles")

    api = data.get("api_5k", {})
    if api:
        groups = {"list": lambda k: k.startswith("list"), "message": lambda k: k == "message",
                  "raw": lambda k: k == "raw"}
        present = [s for s in systems if s in api]
        fig, ax = plt.subplots(figsize=(8, 4.2))
        w = 0.8 / max(1, len(present))
        for j, s in enumerate(present):
            ys, labels = [], []
            for g, match in groups.items():
                cands = [(k, v["rps"]) for k, v in api[s].items() if match(k)]
                k, v = max(cands, key=lambda kv: kv[1]) if cands else ("", 0)
                ys.append(v)
                labels.append(k)
            bars = ax.bar([i + (j - (len(present) - 1) / 2) * w for i in range(len(groups))], ys, w, label=s,
                          color=COLORS.get(s))
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.0f}", (b.get_x() + b.get_width() / 2, max(y, 1)), ha="center", va="bottom",
                            fontsize=7)
        ax.set_xticks(range(len(groups)), ["list (page of 30*)", "single message", "raw source"])
        ax.set_yscale("log")
        ax.set_ylabel("req/s (wrk, log)")
        ax.set_title(f"API with {data.get('api_stored', 5000):,} messages stored "
                     "(* maildump: its whole store; maildev: its faster list)")
        ax.legend(fontsize=8)
        save(fig, "compare-api.png", "API req/s by system and endpoint")

    mem = data.get("memory", {})
    if mem:
        fig, ax = plt.subplots(figsize=(7, 4))
        names = list(mem)
        bottoms = [0.0] * len(names)
        pss = [sum(g["pss_mb"] for g in mem[s]["after_mail"].values()) for s in names]
        palette = ["#1f77b4", "#aec7e8", "#ff7f0e", "#2ca02c", "#9e9e9e"]
        groups = []
        for s in names:
            for g in mem[s]["after_mail"]:
                if g not in groups:
                    groups.append(g)
        for gi, g in enumerate(groups):
            ys = [mem[s]["after_mail"].get(g, {}).get("rss_mb", 0) for s in names]
            ax.bar(names, ys, 0.6, bottom=bottoms, label=g, color=COLORS.get(g, palette[gi % len(palette)]),
                   edgecolor="white")
            bottoms = [b + y for b, y in zip(bottoms, ys)]
        for i, b in enumerate(bottoms):
            ax.annotate(f"RSS {b:.0f} MB\n(PSS {pss[i]:.0f})", (i, b), ha="center", va="bottom", fontsize=8)
        ax.set_ylim(top=max(bottoms) * 1.25)
        ax.set_ylabel("resident MB (sum of RSS)")
        ax.set_title(f"Memory after {data.get('api_stored', 5000):,} mails (Postfix: its daemons)")
        ax.legend(fontsize=8, loc="upper right")
        save(fig, "compare-memory.png", "Resident memory after 5,000 mails")

    sc = sorted(data.get("scaling", []), key=lambda r: r["stored"])
    ing = sorted(data.get("ingest", []), key=lambda r: r["stored"])
    if sc or ing:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        xs = [r["stored"] for r in sc]
        for ep, color in (("list", "#1f77b4"), ("message", "#ff7f0e"), ("raw", "#2ca02c")):
            axes[0].plot(xs, [r["api"][ep]["rps"] for r in sc], "o-", label=ep, color=color)
            axes[1].plot(xs, [r["api"][ep]["p99"] for r in sc], "o-", label=f"{ep} p99", color=color)
            axes[1].plot(xs, [r["api"][ep]["p50"] for r in sc], "o:", label=f"{ep} p50", color=color, alpha=0.6)
        axes[0].set_title("API req/s")
        axes[1].set_title("API latency ms")
        for ax in axes[:2]:
            ax.set_xscale("log")
            ax.set_xlabel("messages stored")
            ax.legend(fontsize=7)
            ax.set_ylim(bottom=0)
        if ing:
            xi = [max(r["stored"], 1_000) for r in ing]
            axes[2].plot(xi, [r["rate_total"] for r in ing], "o-", label="msg/s (from spawn)")
            axes[2].plot(xi, [r["rate_drain"] for r in ing], "o:", label="msg/s (drain)")
            axes[2].set_xscale("log")
            axes[2].set_xlabel("messages stored before (0 shown at 1,000)")
            axes[2].set_title(f"Ingest of {data.get('ingest_n')} mails, checks {data.get('auth')}")
            axes[2].set_ylim(bottom=0)
            axes[2].legend(fontsize=7)
        save(fig, "compare-scaling.png", "Scaling: our API and ingest from 10k to 1M stored messages")
    return out
