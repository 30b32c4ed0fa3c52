#!/usr/bin/env python3
"""Where the floor is under real-client load (issue 19): profiles both relays and splits their
CPU by path.

For each real-client rate of `scripts/bench` (R1 20 k, R2 60 k pkt/s; `derpinterop load`, real
`derphttp` clients of the newest Tailscale release) and each relay, alternating like run.py:

1. a measured run without the profiler: CPU per delivered packet from /proc, as in R1/R2;
2. a profiled run: `perf record -e cpu-clock -g -p PID` for the middle of the window, then
   every sample is put on one path by its call chain (PATHS below).

The profiler's own cost inflates the CPU of the profiled run, so only its *shares* are used;
they are applied to the measured run's CPU per packet. What the relay cannot avoid is the TCP
work of the packet itself (the send and receive paths); `epoll_wait` and the system call entry
and exit are what a completion interface (io_uring) could remove at best; the rest is user
space. Writes profile.json and profile.md into --out. Driven by `scripts/bench --profile`.
"""

import argparse
import collections
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as R  # noqa: E402  (the benchmark driver: relays, load command, rates)

# (key, label) in the order a sample is tested; the first match wins.
PATHS = [
    ("user", "user space (binary, libc, vdso)"),
    ("epoll", "`epoll_wait`, including sleeping in it and being woken"),
    ("entry", "system call entry and exit (own time)"),
    ("send", "send path (`sendto`/`write` → TCP output, loopback delivery to the receiver, its wake-up)"),
    ("recv", "receive path (`recvfrom`/`read` → TCP input queue, copy out, window updates)"),
    ("sched", "futex and scheduling outside `epoll_wait`"),
    ("other", "other kernel"),
]
# Leaf functions that are the system call boundary itself, not work done for the call.
ENTRY_LEAVES = ("entry_SYSCALL", "do_syscall_64", "syscall_exit", "syscall_return", "exit_to_user",
                "arch_exit_to_user", "x64_sys_call", "fdget", "__fget", "fput", "switch_fpu",
                "restore_fpregs", "__rseq", "rseq_")
SEND_MARKS = ("tcp_sendmsg", "sock_sendmsg", "__sys_sendto", "ksys_write", "sock_write_iter")
RECV_MARKS = ("tcp_recvmsg", "sock_recvmsg", "__sys_recvfrom", "ksys_read", "sock_read_iter")


def classify(stack):
    """The path of one sample; `stack` is [(symbol, dso)], leaf first."""
    if not stack:
        return "other"
    leaf, dso = stack[0]
    if "kernel.kallsyms" not in dso:
        return "user"
    syms = [s for s, _ in stack]
    if any(s.startswith(("do_epoll_wait", "ep_poll", "__x64_sys_epoll")) for s in syms):
        return "epoll"
    if leaf.startswith(ENTRY_LEAVES):
        return "entry"
    if any(s.startswith(SEND_MARKS) for s in syms):
        return "send"
    if any(s.startswith(RECV_MARKS) for s in syms):
        return "recv"
    if any("futex" in s or s.startswith(("schedule", "__schedule")) for s in syms):
        return "sched"
    return "other"


def parse_perf_script(text):
    """Samples of `perf script -F ip,sym,dso`: a list of [(symbol, dso)], leaf first."""
    samples = []
    for block in text.split("\n\n"):
        stack = []
        for line in block.strip().splitlines():
            parts = line.strip().split(None, 1)
            if len(parts) < 2:
                continue
            rest = parts[1]
            sym, _, dso = rest.rpartition(" (")
            stack.append((sym or rest, dso.rstrip(")")))
        if stack:
            samples.append(stack)
    return samples


def split(perf, datafile):
    """Share (0..1) of the samples on each path, and the number of samples."""
    out = subprocess.run([perf, "script", "-i", datafile, "-F", "ip,sym,dso"],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"perf script -i {datafile} failed: {out.stderr.strip()[-1000:]}")
    samples = parse_perf_script(out.stdout)
    counts = collections.Counter(classify(s) for s in samples)
    n = len(samples)
    return {k: counts[k] / n for k, _ in PATHS} if n else {}, n


def profiled_run(args, perf, relay, largs, lcommon, window, datafile):
    """One load run with `perf record` attached to the relay for the middle of the window."""
    cmd = R.interop_load_cmd(args, relay, largs, lcommon, not args.no_pin)
    load = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        warmup, duration, record = window
        time.sleep(warmup + (duration - record) / 2)
        rec = subprocess.run([perf, "record", "-q", "-e", "cpu-clock", "-F", str(args.freq), "-g",
                              "-p", str(relay.proc.pid), "-o", datafile, "--", "sleep", str(record)],
                             capture_output=True, text=True, timeout=record + 60)
        stdout, stderr = load.communicate(timeout=360)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    if rec.returncode != 0:
        raise RuntimeError(f"perf record on {relay.name} failed: {rec.stderr.strip()[-1000:]}")
    R.interop_load_result(relay, load.returncode, stdout, stderr)
    try:
        return split(perf, datafile)
    finally:
        os.remove(datafile)


def summarize(runs):
    """Per relay and rate: median measured CPU per packet, median share per path, µs per path."""
    rows = {}
    for key, by_relay in runs.items():
        for name, rs in by_relay.items():
            cpu = statistics.median(r["cpu_us"] for r in rs)
            shares = {k: statistics.median(r["shares"].get(k, 0.0) for r in rs) for k, _ in PATHS}
            norm = sum(shares.values()) or 1.0
            rows.setdefault(key, {})[name] = dict(
                cpu_us=cpu, shares={k: v / norm for k, v in shares.items()},
                us={k: cpu * v / norm for k, v in shares.items()},
                samples=[r["samples"] for r in rs], cpu_runs=[r["cpu_us"] for r in rs])
    return rows


def floors(rows):
    """Ours against upstream's total per rate: now, the TCP work alone, and at best with io_uring."""
    out = {}
    for key, r in rows.items():
        if "ours" not in r or "upstream" not in r:
            continue
        ours, up = r["ours"], r["upstream"]["cpu_us"]
        tcp = ours["us"]["send"] + ours["us"]["recv"]
        ring = ours["cpu_us"] - ours["us"]["epoll"] - ours["us"]["entry"]
        out[key] = dict(now=ours["cpu_us"] / up, tcp_work_us=tcp, tcp_work=tcp / up,
                        io_uring_best_us=ring, io_uring_best=ring / up,
                        target_us=0.4 * up,
                        user_and_waiting_budget_us=0.4 * up - tcp,
                        user_and_waiting_now_us=ours["cpu_us"] - tcp)
    return out


def markdown(meta, rows, fl):
    lines = [f"# Relay CPU by path under real-client load ({meta['started']} UTC)", "",
             f"`{meta['command']}` at `{meta['ours_commit']}` against upstream derper {meta['upstream_version']}; "
             f"{meta['cpu']}, {meta['cores']} cores, kernel {meta['kernel']}; {meta['runs']} measured and "
             f"{meta['runs']} profiled run(s) per relay and rate; `perf record -e cpu-clock -F {meta['freq']} -g` "
             f"for {meta['record_s']} s in the middle of each profiled window; SCHED_FIFO: {meta['fifo']}; "
             f"load average before {' '.join(meta['loadavg_before'])}.", "",
             "µs of relay CPU per delivered packet (measured runs) split by the profiled runs' shares of samples:", ""]
    keys = [k for k in ("rc_20k", "rc_60k") if k in rows]
    head = "| path |" + "".join(f" {k} ours | {k} upstream |" for k in keys)
    lines += [head, "|---|" + "---|---|" * len(keys)]
    for p, label in PATHS:
        cells = []
        for k in keys:
            for name in ("ours", "upstream"):
                x = rows[k].get(name)
                cells.append(f" {x['us'][p]:.2f} ({100 * x['shares'][p]:.1f} %) |" if x else " — |")
        lines.append(f"| {label} |" + "".join(cells))
    cells = []
    for k in keys:
        for name in ("ours", "upstream"):
            x = rows[k].get(name)
            cells.append(f" **{x['cpu_us']:.2f}** |" if x else " — |")
    lines.append("| **total** (measured, no profiler) |" + "".join(cells))
    lines += ["", "Ours ÷ upstream's total CPU per packet:", "",
              "| rate | now | the TCP work alone (send + receive paths) | with `epoll_wait` and syscall entry/exit removed (io_uring at best) | the 0.4× target leaves for user space and waiting | ours spends there now |",
              "|---|---|---|---|---|---|"]
    for k in keys:
        f = fl.get(k)
        if f:
            lines.append(f"| {k} | {f['now']:.3f}× | {f['tcp_work_us']:.2f} µs = **{f['tcp_work']:.3f}×** | "
                         f"{f['io_uring_best_us']:.2f} µs = {f['io_uring_best']:.3f}× | "
                         f"{f['user_and_waiting_budget_us']:.2f} µs | {f['user_and_waiting_now_us']:.2f} µs |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for a in ("--ours", "--upstream", "--upstream-version", "--interop", "--out"):
        p.add_argument(a, required=True)
    p.add_argument("--perf", default="perf")
    p.add_argument("--runs", type=int, default=2, help="measured and profiled runs per relay and rate")
    p.add_argument("--freq", type=int, default=20000, help="perf record sampling frequency (Hz)")
    p.add_argument("--smoke", action="store_true", help="a second or so per run: checks that it works")
    p.add_argument("--fifo", action="store_true", help="relays and generators under SCHED_FIFO (chrt -f 1)")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--command", default="scripts/bench --profile")
    args, _ = p.parse_known_args()
    if args.fifo:
        R.RT_PREFIX[:] = ["chrt", "-f", "1"]
    if os.cpu_count() < 2:
        args.no_pin = True
    window = (0.2, 1.2, 0.4) if args.smoke else (1.0, 5.0, 2.0)
    if args.smoke:
        args.runs = 1
    lcommon = ["-warmup", f"{window[0]}s", "-duration", f"{window[1]}s"]
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="derp-profile-")
    os.makedirs(f"{work}/certs")
    relays = [R.Relay("ours", args.ours, work, not args.no_pin),
              R.Relay("upstream", args.upstream, work, not args.no_pin)]
    meta = dict(R.run_meta(args.command, args.upstream_version), runs=args.runs, fifo=args.fifo,
                freq=args.freq, record_s=window[2])
    # The load commands count no system calls (`perf stat` on every call would cost the relay
    # with more calls a little more, bench/README.md); perf here only records samples.
    perf, args.perf = args.perf, ""
    runs = {}
    for key, largs in R.rc_workloads(args.smoke):
        if key not in ("rc_20k", "rc_60k"):
            continue
        for rep in range(args.runs):
            for relay in (relays if rep % 2 == 0 else list(reversed(relays))):
                relay.start()
                try:
                    measured = R.run_interop_load(args, relay, largs, lcommon, not args.no_pin)
                finally:
                    relay.stop()
                relay.start()
                try:
                    shares, n = profiled_run(args, perf, relay, largs, lcommon, window,
                                             f"{work}/{relay.name}-{key}-{rep}.data")
                finally:
                    relay.stop()
                if not n:
                    raise RuntimeError(f"perf recorded no samples of {relay.name} at {key}")
                runs.setdefault(key, {}).setdefault(relay.name, []).append(
                    dict(cpu_us=measured["server_cpu_us_per_pkt"], shares=shares, samples=n))
                R.log(f"profile {key} run {rep} {relay.name:8s} cpu_us/pkt={measured['server_cpu_us_per_pkt']:.3g} "
                      f"samples={n} " + " ".join(f"{k}={100 * v:.1f}%" for k, v in shares.items()))
    shutil.rmtree(work, ignore_errors=True)
    rows = summarize(runs)
    fl = floors(rows)
    meta["finished"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    with open(f"{args.out}/profile.json", "w") as f:
        json.dump(dict(meta=meta, paths=dict(PATHS), rows=rows, floors=fl, runs=runs), f, indent=1)
    md = markdown(meta, rows, fl)
    with open(f"{args.out}/profile.md", "w") as f:
        f.write(md)
    print(md)
    R.log(f"wrote {args.out}/profile.json, profile.md")


if __name__ == "__main__":
    main()
