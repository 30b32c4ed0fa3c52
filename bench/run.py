#!/usr/bin/env python3
"""Runs our derper and upstream Go derper alternately under derp-bench (performance.md §5.5).

Each run starts a fresh relay pinned to one core (taskset), runs one derp-bench workload pinned
to the other core, stops the relay. For every workload the two relays alternate (ours, upstream,
upstream, ours, ...) for --runs runs each. Writes results.json, results.md and (if matplotlib is
importable) PNG plots into --out.

Standard library only (matplotlib is optional). Driven by scripts/bench.
"""

import argparse
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

SERVER_CPU = "0"
CLIENT_CPU = "1"
# --fifo: relays and load generators run SCHED_FIFO (chrt -f 1), for a shared machine where
# other processes on the relay's core would otherwise delay its wake-ups by milliseconds.
RT_PREFIX = []


def log(*a):
    print("[bench]", *a, file=sys.stderr, flush=True)


def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Relay:
    """One relay process (ours or upstream), pinned to SERVER_CPU."""

    def __init__(self, name, binary, workdir, pin, tag=None, certdir=None, extra=(), env=None):
        self.name, self.binary, self.workdir, self.pin = name, binary, workdir, pin
        self.tag = tag or name
        self.certdir = certdir or f"{workdir}/certs"
        self.extra, self.env = list(extra), dict(env or {})
        self.proc = None
        self.port = None

    def bench_args(self):
        return ["--addr", f"127.0.0.1:{self.port}", "--stun-addr", f"127.0.0.1:{self.stun_port}",
                "--server-pid", str(self.proc.pid)]

    def start(self, port=None):
        self.port = port or free_port()
        self.stun_port = free_port(socket.SOCK_DGRAM)
        # Same flags, spelled so both parse them; the certificate directory is shared, so
        # both serve the same self-signed ECDSA P-256 certificate (performance.md §5.5).
        args = [
            self.binary,
            "--hostname=127.0.0.1",
            "--certmode=manual",
            f"--certdir={self.certdir}",
            "-a", f"127.0.0.1:{self.port}",
            "--http-port=-1",
            f"--stun-port={self.stun_port}",
            "-c", f"{self.workdir}/{self.tag}.key",
        ] + self.extra
        if self.name == "ours":
            # Our relay also serves metrics on an admin listener (default 127.0.0.1:3480);
            # upstream has none. Port 0 keeps parallel runs from colliding.
            args.append("--admin-addr=127.0.0.1:0")
        if self.pin:
            args = ["taskset", "-c", SERVER_CPU] + args
        args = RT_PREFIX + args
        env = dict(os.environ, RUST_LOG="warn", **self.env)
        self.logf = open(f"{self.workdir}/{self.tag}.log", "ab")
        self.proc = subprocess.Popen(args, stdout=self.logf, stderr=self.logf, env=env)
        deadline = time.time() + 15
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.logf.name}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"{self.name} did not listen on {self.port}")
        time.sleep(0.3)  # let STUN bind too
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()


class MeshPair:
    """Two relays of one kind meshed with each other (same flags for ours and upstream:
    --mesh-psk-file, --mesh-with the other one), both pinned to SERVER_CPU. They serve a
    certificate from a throwaway CA that their mesh clients trust through SSL_CERT_FILE.
    derp-bench connects senders to A and receivers to B, so every packet crosses the mesh;
    the CPU of both relays counts as server CPU."""

    def __init__(self, name, binary, workdir, pin, meshdir, psk):
        env = {"SSL_CERT_FILE": f"{meshdir}/ca.pem"}
        common = dict(certdir=meshdir, env=env)
        self.name = name
        self.a = Relay(name, binary, workdir, pin, tag=f"{name}-mesh-a", **common)
        self.b = Relay(name, binary, workdir, pin, tag=f"{name}-mesh-b", **common)
        self.psk = psk

    def start(self):
        pa, pb = free_port(), free_port()
        self.a.extra = ["--mesh-psk-file", self.psk, f"--mesh-with=127.0.0.1:{pb}"]
        self.b.extra = ["--mesh-psk-file", self.psk, f"--mesh-with=127.0.0.1:{pa}"]
        self.a.start(pa)
        try:
            self.b.start(pb)
        except Exception:
            self.a.stop()
            raise
        return self

    def stop(self):
        self.a.stop()
        self.b.stop()

    def bench_args(self):
        return self.a.bench_args() + ["--peer-addr", f"127.0.0.1:{self.b.port}",
                                      "--peer-pid", str(self.b.proc.pid)]


def run_bench(bench, relay, workload, wargs, common, pin, src_net):
    args = [bench] + relay.bench_args() + ["--src-net", str(src_net)] + common + [workload] + wargs
    if pin:
        args = ["taskset", "-c", CLIENT_CPU] + args
    args = RT_PREFIX + args
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"derp-bench {workload} against {relay.name} failed: {out.stderr.strip()[-2000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    # performance.md §6 states T1/T2 per server core: what the relay delivered per core-second
    # it used. It does not depend on whether the relay or the load generator was the
    # bottleneck of the run.
    if res.get("delivered_pps") and res.get("server_util"):
        res["pps_per_core"] = res["delivered_pps"] / res["server_util"]
    return res


def run_meta(command, upstream_version):
    """What a result file records about its run: start time, command, commit, machine, load."""
    return dict(started=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
                command=command, upstream_version=upstream_version,
                ours_commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip(),
                kernel=platform.release(), cores=os.cpu_count(),
                cpu=next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
                loadavg_before=open("/proc/loadavg").read().split()[:3])


def get(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# (id, title, workload key, metric path, unit, target text, direction, pass bar, stretch)
# direction "higher": ratio >= bar passes; "lower": ratio <= bar passes; "abs_le": ours <= bar.
METRICS = [
    ("T1", "Relayed pkt/s, 1400 B, TLS (capacity, no loss)", "tput_1400", "delivered_pps", "pkt/s", "≥ 1.5× (stretch 2.5×)", "higher", 1.5, 2.5),
    ("T1b", "Relayed Gbit/s, 1400 B payload", "tput_1400", "gbit_s", "Gbit/s", "(same run as T1)", "higher", 1.5, 2.5),
    ("T1p", "Relayed pkt/s per relay core, 1400 B (delivered ÷ relay core use)", "tput_1400", "pps_per_core", "pkt/s/core", "≥ 1.5× (stretch 2.5×)", "higher", 1.5, 2.5),
    ("T1c", "Relay CPU per relayed 1400 B packet", "tput_1400", "server_cpu_us_per_pkt", "µs", "(info: 1 ÷ this = pkt/s per core when relay-bound)", "info", None, None),
    ("T2", "Relayed pkt/s, 64 B", "tput_64", "delivered_pps", "pkt/s", "≥ 2× (stretch 3×)", "higher", 2.0, 3.0),
    ("T2p", "Relayed pkt/s per relay core, 64 B (delivered ÷ relay core use)", "tput_64", "pps_per_core", "pkt/s/core", "≥ 2× (stretch 3×)", "higher", 2.0, 3.0),
    ("T2c", "Relay CPU per relayed 64 B packet", "tput_64", "server_cpu_us_per_pkt", "µs", "(info)", "info", None, None),
    ("T3", "Relay CPU-s per GB at fixed load (1312 B)", "cpu_gb", "server_cpu_s_per_gb", "CPU-s/GB", "≤ 0.6× (stretch 0.4×)", "lower", 0.6, 0.4),
    ("T4", "Goodput at 1.5× upstream capacity, 1400 B", "over150", "delivered_pps", "pkt/s", "ours ≥ upstream capacity, loss ≤ 2 %", "t4", None, None),
    ("T4b", "Loss at 1.5× upstream capacity", "over150", "loss_pct_window", "%", "≤ 2 %", "info", None, None),
    ("T4c", "Goodput at 3× upstream capacity, 1400 B", "over300", "delivered_pps", "pkt/s", "(stretch of T4: no collapse up to 3×)", "info", None, None),
    ("T4d", "Loss at 3× upstream capacity", "over300", "loss_pct_window", "%", "(info)", "info", None, None),
    ("T5", "RSS per idle TLS connection (10 k conns)", "idle", "kib_per_conn", "KiB", "≤ 10 KiB (stretch 6 KiB)", "abs_le", 10.0, 6.0),
    ("T6", "TLS+DERP handshakes/s (32 dialers)", "churn", "handshakes_per_s", "conn/s", "≥ 1.5× (stretch 2×)", "higher", 1.5, 2.0),
    ("T6b", "Relay CPU per handshake", "churn", "server_cpu_us_per_conn", "µs", "(info)", "info", None, None),
    ("T7", "p99 one-way latency at 80 % of upstream capacity", "lat80", "latency.p99_us", "µs", "≤ 0.6× (stretch 0.4×)", "lower", 0.6, 0.4),
    ("T7b", "p50 one-way latency at 80 % of upstream capacity", "lat80", "latency.p50_us", "µs", "(info)", "info", None, None),
    ("T7c", "p50 one-way latency, idle (1 k pkt/s)", "lat_idle", "latency.p50_us", "µs", "≤ 1.05×", "lower", 1.05, None),
    ("T8", "Jain fairness, 8 blasting flows", "fair", "jain", "index", "ours ≥ 0.95", "abs_ge", 0.95, None),
    ("T9", "Active pairs with 10 k idle conns ÷ without", "idle", "active_ratio", "ratio", "ours ≥ 0.95 (stretch 0.98)", "abs_ge", 0.95, 0.98),
    ("T10", "STUN responses/s", "stun", "responses_per_s", "resp/s", "≥ 2× (stretch 4×)", "higher", 2.0, 4.0),
    ("T10c", "Relay CPU per STUN response", "stun", "server_cpu_us_per_response", "µs", "(info)", "info", None, None),
    # Real-client rows (issue 19): the load is tailscale.com/derp/derphttp itself (derpinterop
    # load, tests/interop/src/load.go): one DERP frame, TLS record and write(2) per packet.
    ("R1", "Real clients, 20 k pkt/s × 1312 B: relay CPU per delivered packet", "rc_20k", "server_cpu_us_per_pkt", "µs", "≤ 0.4× (issue 19)", "lower", 0.4, None),
    ("R1s", "Real clients, 20 k pkt/s: relay system calls per delivered packet", "rc_20k", "syscalls_per_pkt", "syscalls", "(info)", "info", None, None),
    ("R1x", "Real clients, 20 k pkt/s: relay context switches per delivered packet", "rc_20k", "ctx_switches_per_pkt", "switches", "(info)", "info", None, None),
    ("R1l", "Real clients, 20 k pkt/s: p50 one-way latency", "rc_20k", "latency.p50_us", "µs", "(info)", "info", None, None),
    ("R1t", "Real clients, 20 k pkt/s: p99 one-way latency", "rc_20k", "latency.p99_us", "µs", "(info)", "info", None, None),
    ("R2", "Real clients, 60 k pkt/s × 1312 B: relay CPU per delivered packet", "rc_60k", "server_cpu_us_per_pkt", "µs", "≤ 0.4× (issue 19)", "lower", 0.4, None),
    ("R2s", "Real clients, 60 k pkt/s: relay system calls per delivered packet", "rc_60k", "syscalls_per_pkt", "syscalls", "(info)", "info", None, None),
    ("R2x", "Real clients, 60 k pkt/s: relay context switches per delivered packet", "rc_60k", "ctx_switches_per_pkt", "switches", "(info)", "info", None, None),
    ("R2l", "Real clients, 60 k pkt/s: p50 one-way latency", "rc_60k", "latency.p50_us", "µs", "(info)", "info", None, None),
    ("R2t", "Real clients, 60 k pkt/s: p99 one-way latency", "rc_60k", "latency.p99_us", "µs", "(info)", "info", None, None),
    ("R3", "Real clients: capacity (highest offered pkt/s with ≤ 0.1 % loss), 1312 B", "rc_cap", "capacity_pps", "pkt/s", "≥ 2× (issue 19)", "higher", 2.0, None),
    # The Go generator shares cpu1 and runs out first (R3 carries "not a capacity" then), so R3p
    # is the relay-bound view of the same runs, as T1p is for T1: delivered ÷ relay core use.
    ("R3p", "Real clients at capacity: delivered pkt/s per relay core (delivered ÷ relay core use)", "rc_cap", "pps_per_core", "pkt/s/core", "≥ 2× (issue 19)", "higher", 2.0, None),
    ("R3c", "Real clients at capacity: relay CPU per delivered packet", "rc_cap", "server_cpu_us_per_pkt", "µs", "(info)", "info", None, None),
    ("R3l", "Real clients at capacity: p50 one-way latency", "rc_cap", "latency.p50_us", "µs", "(info)", "info", None, None),
    ("R3t", "Real clients at capacity: p99 one-way latency", "rc_cap", "latency.p99_us", "µs", "(info)", "info", None, None),
    ("M1", "Mesh-forwarded pkt/s, 1400 B (capacity, no loss; relay A → mesh → relay B)", "mesh_1400", "delivered_pps", "pkt/s", "(no §6 target)", "info", None, None),
    ("M1c", "CPU of both relays per mesh-forwarded 1400 B packet", "mesh_1400", "server_cpu_us_per_pkt", "µs", "(info)", "info", None, None),
]


def workloads(smoke, cap_up=None):
    """(key, derp-bench subcommand, args) for phase A, or phase B when cap_up is given."""
    if cap_up is None:
        fleet = "100" if smoke else "10000"
        return [
            ("tput_1400", "throughput", ["--pairs", "16", "--size", "1400", "--window", "24"]),
            ("tput_64", "throughput", ["--pairs", "16", "--size", "64", "--window", "24"]),
            ("cpu_gb", "rate", ["--pairs", "4", "--size", "1312", "--rate", "2000" if smoke else "50000"]),
            ("fair", "blast", ["--flows", "8", "--size", "1400"]),
            ("churn", "churn", ["--concurrency", "32"]),
            ("stun", "stun", ["--sockets", "4", "--window", "16"]),
            ("idle", "idle", ["--conns", fleet, "--pairs", "4", "--settle", "0.5" if smoke else "2"]),
        ]
    return [
        ("lat_idle", "rate", ["--pairs", "1", "--size", "1400", "--rate", "1000"]),
        ("lat80", "rate", ["--pairs", "16", "--size", "1400", "--rate", str(round(0.8 * cap_up))]),
        # Overload comes from the total rate, not from bursts: derp-bench's 1 ms pacing timer
        # fires late, and a flow's burst longer than the relay's 32-packet queue (both relays)
        # is head-dropped at any load. 48 pairs keep a flow's nominal burst near 6 packets
        # per tick at 1.5× and 12 at 3× (bench/README.md, "T4: why ... 48 pairs").
        ("over150", "rate", ["--pairs", "48", "--size", "1400", "--rate", str(round(1.5 * cap_up))]),
        ("over300", "rate", ["--pairs", "48", "--size", "1400", "--rate", str(round(3.0 * cap_up))]),
    ]


def mesh_workloads():
    """(key, derp-bench subcommand, args) run on MeshPairs."""
    return [("mesh_1400", "throughput", ["--pairs", "16", "--size", "1400", "--window", "24"])]


def rc_workloads(smoke):
    """(key, derpinterop load args) of the real-client workloads: 16 pairs, 1312 B."""
    base = ["-pairs", "16", "-size", "1312"]
    if smoke:
        return [("rc_20k", base + ["-rate", "2000"]),
                ("rc_60k", base + ["-rate", "3000"]),
                # Asserts nothing about speed: any loss and any send rate meet the bar.
                ("rc_cap", base + ["-capacity", "-rate", "2000", "-max-rate", "3000", "-steps", "1",
                                   "-max-loss", "100", "-min-sent", "0"])]
    return [("rc_20k", base + ["-rate", "20000"]),
            ("rc_60k", base + ["-rate", "60000"]),
            # Rises ×1.5 from 20 k until a trial loses > 0.1 % (or the generator sends < 98 %
            # of what is offered: then the row is a lower bound), then bisects 4 times.
            ("rc_cap", base + ["-capacity", "-rate", "20000", "-steps", "4"])]


def cert_sha256(certdir):
    """sha256 of the DER of the relays' shared self-signed certificate (a sha256-raw CertName)."""
    import base64
    import hashlib
    pem = open(f"{certdir}/127.0.0.1.crt").read()
    b64 = pem.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
    return hashlib.sha256(base64.b64decode("".join(b64.split()))).hexdigest()


def write_derpmap(relay, path):
    """A one-node derpMap for the relay, pinned by sha256-raw like a real client's."""
    node = {"Name": "900a", "RegionID": 900, "HostName": "127.0.0.1", "IPv4": "127.0.0.1",
            "DERPPort": relay.port, "STUNPort": -1, "CertName": "sha256-raw:" + cert_sha256(relay.certdir)}
    with open(path, "w") as f:
        json.dump({"Regions": {"900": {"RegionID": 900, "RegionCode": "bench", "RegionName": "bench",
                                       "Nodes": [node]}}}, f)


def interop_load_cmd(args, relay, largs, common, pin):
    """The `derpinterop load` command line against a started relay (pinned to CLIENT_CPU)."""
    dm = f"{relay.workdir}/{relay.tag}-derpmap.json"
    write_derpmap(relay, dm)
    cmd = [args.interop, "load", "-derpmap", dm, "-server-pid", str(relay.proc.pid), "-timeout", "300s"] + common + largs
    if args.perf:
        cmd += ["-perf", args.perf]
    if pin:
        cmd = ["taskset", "-c", CLIENT_CPU] + cmd
    return RT_PREFIX + cmd


def interop_load_result(relay, returncode, stdout, stderr):
    """Parses what `derpinterop load` printed; raises if it failed."""
    if returncode != 0:
        raise RuntimeError(f"derpinterop load against {relay.name} failed: {stdout.strip()[-1500:]} {stderr.strip()[-1500:]}")
    res = json.loads(stdout)
    if not res.get("ok"):
        raise RuntimeError(f"derpinterop load against {relay.name}: {res}")
    if res.get("delivered_pps") and res.get("server_util"):
        res["pps_per_core"] = res["delivered_pps"] / res["server_util"]
    return res


def run_interop_load(args, relay, largs, common, pin):
    cmd = interop_load_cmd(args, relay, largs, common, pin)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=360)
    return interop_load_result(relay, out.returncode, out.stdout, out.stderr)


def run_rc_phase(args, relays, common, results, counter):
    """The real-client workloads, alternating relays like run_phase."""
    lcommon = ["-warmup", common[1] + "s", "-duration", common[3] + "s"]
    for key, largs in rc_workloads(args.smoke):
        if args.only_set and key not in args.only_set:
            continue
        for r in range(args.runs):
            order = relays if r % 2 == 0 else list(reversed(relays))
            for relay in order:
                counter[0] += 1
                if not args.smoke:
                    relay.start()
                try:
                    res = run_interop_load(args, relay, largs, lcommon, not args.no_pin)
                finally:
                    if not args.smoke:
                        relay.stop()
                res["run"] = r
                results.setdefault(key, {}).setdefault(relay.name, []).append(res)
                log(f"{key:9s} run {r} {relay.name:8s} delivered={res.get('delivered_pps', 0):.0f} "
                    f"cpu_us/pkt={res.get('server_cpu_us_per_pkt', 0):.3g} syscalls/pkt={res.get('syscalls_per_pkt', 0):.3g} "
                    f"ctx/pkt={res.get('ctx_switches_per_pkt', 0):.3g} capacity={res.get('capacity_pps')} "
                    f"server_util={res.get('server_util', 0):.2f} client_util={res.get('client_util', 0):.2f}")


def run_phase(args, relays, wls, common, results, counter):
    for key, sub, wargs in wls:
        for r in range(args.runs):
            order = relays if r % 2 == 0 else list(reversed(relays))
            for relay in order:
                counter[0] += 1
                src_net = 2 + counter[0] % 250
                # Full runs restart the relay for every run (§5.5); --smoke keeps one process
                # per relay for the whole run so that it takes seconds.
                if not args.smoke:
                    relay.start()
                try:
                    res = run_bench(args.bench, relay, sub, wargs, common, not args.no_pin, src_net)
                finally:
                    if not args.smoke:
                        relay.stop()
                res["run"] = r
                results.setdefault(key, {}).setdefault(relay.name, []).append(res)
                log(f"{key:9s} run {r} {relay.name:8s} " + brief(key, res))


def brief(key, res):
    for m in METRICS:
        if m[2] == key:
            v = get(res, m[3])
            if v is not None:
                return f"{m[3]}={v:.4g} server_util={res.get('server_util', 0):.2f} client_util={res.get('client_util', 0):.2f}"
    return ""


def summarize(results, cap_up):
    rows = []
    for tid, title, key, path, unit, target, direction, bar, stretch in METRICS:
        runs = results.get(key, {})
        ours = [get(x, path) for x in runs.get("ours", [])]
        up = [get(x, path) for x in runs.get("upstream", [])]
        mo, mu = median(ours), median(up)
        ratio = mo / mu if (mo is not None and mu) else None
        # Median of per-pair ratios (run i of ours with run i of upstream).
        pairs = [o / u for o, u in zip(ours, up) if o is not None and u]
        pair_ratio = median(pairs)
        client_bound = any(x.get("client_bound") for side in runs.values() for x in side)
        util = {side: median([x.get("server_util") for x in xs]) for side, xs in runs.items()}
        # A capacity is only a capacity if the relay used (nearly) its whole core.
        saturated = bool(util) and all(u is not None and u >= 0.8 for u in util.values())
        verdict = "—"
        if direction == "higher" and ratio is not None:
            verdict = "stretch" if stretch and ratio >= stretch else ("pass" if ratio >= bar else "FAIL")
        elif direction == "lower" and ratio is not None:
            verdict = "stretch" if stretch and ratio <= stretch else ("pass" if ratio <= bar else "FAIL")
        elif direction == "abs_le" and mo is not None:
            verdict = "stretch" if stretch and mo <= stretch else ("pass" if mo <= bar else "FAIL")
        elif direction == "abs_ge" and mo is not None:
            verdict = "stretch" if stretch and mo >= stretch else ("pass" if mo >= bar else "FAIL")
        elif direction == "t4" and mo is not None and cap_up:
            def holds(k):
                """Ours at workload k: goodput ≥ upstream's capacity with ≤ 2 % loss."""
                xs = results.get(k, {}).get("ours", [])
                g = median([get(x, "delivered_pps") for x in xs])
                loss = median([get(x, "loss_pct_window") for x in xs])
                return g is not None and loss is not None and g >= cap_up and loss <= 2.0
            # Stretch (§6): no collapse up to 3×, i.e. the 3× run holds the same bar.
            verdict = ("stretch" if holds("over300") else "pass") if holds(key) else "FAIL"
        rows.append(dict(id=tid, title=title, workload=key, metric=path, unit=unit, target=target,
                         ours=mo, upstream=mu, ratio=ratio, pair_ratio=pair_ratio,
                         ours_runs=ours, upstream_runs=up, verdict=verdict,
                         client_bound=client_bound, server_util=util, saturated=saturated))
    return rows


def fmt(v):
    if v is None:
        return "—"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def markdown(meta, rows):
    out = [f"# derper vs upstream derper {meta['upstream_version']}", "",
           f"Run {meta['started']} → {meta['finished']} UTC, `{meta['command']}`", "",
           f"Machine: {meta['cpu']}, {meta['cores']} cores, kernel {meta['kernel']}; "
           + (f"relay pinned to cpu{SERVER_CPU}, derp-bench to cpu{CLIENT_CPU}" if meta["pinned"] else "unpinned")
           + ("; SCHED_FIFO (chrt -f 1)" if meta.get("fifo") else "")
           + f"; {meta['runs']} runs per relay per workload, alternating; medians. "
           f"Load average before: {' '.join(meta['loadavg_before'])}, after: {' '.join(meta['loadavg_after'])}.", "",
           f"Ours: derper {meta['ours_commit']}; upstream: tailscale.com/cmd/derper {meta['upstream_version']}. "
           "TLS 1.3, TLS_AES_128_GCM_SHA256, X25519, the same self-signed ECDSA P-256 certificate; "
           "one TLS record per packet from the load generator.", "",
           "| # | Metric | Ours | Upstream | Ours ÷ upstream | Target | Verdict |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = fmt(r["ratio"]) + "×" if r["ratio"] is not None else "—"
        cb = ""
        if r["id"] in ("T1", "T1b", "T2", "T6", "T10", "R3"):
            if r["client_bound"]:
                cb += " (client-bound in some run: lower bound)"
            if not r["saturated"]:
                u = ", ".join(f"{k} {v:.2f}" for k, v in r["server_util"].items() if v is not None)
                cb += f" (relay not saturated, core use {u}: not a capacity)"
        out.append(f"| {r['id']} | {r['title']} ({r['unit']}) | {fmt(r['ours'])} | {fmt(r['upstream'])} | "
                   f"{ratio} | {r['target']} | {r['verdict']}{cb} |")
    out += ["", f"Upstream capacity used for T4/T7 (median T1 pkt/s of upstream): {fmt(meta['cap_up'])} pkt/s.", "",
            "R rows: the load is real Tailscale clients (`derpinterop load`, tailscale.com/derp/derphttp "
            f"{meta['upstream_version']}, 16 sender→receiver pairs, 1312 B, pinned by sha256-raw CertName; one "
            "DERP frame, TLS record and write(2) per packet). Relay CPU: utime+stime of /proc/PID/stat over the "
            "measured window; context switches: voluntary+nonvoluntary summed over /proc/PID/task/*/status; "
            f"system calls: {meta['syscall_source']}. All per delivered packet.", ""]
    return "\n".join(out) + "\n"


def plots(outdir, rows, results):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not importable: no PNG plots")
        return []
    made = []
    rs = [r for r in rows if r["ratio"] is not None and r["id"] in ("T1", "T1p", "T2", "T2p", "T3", "T6", "T7", "T10", "M1", "R1", "R2", "R3", "R3p")]
    if rs:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        ax.bar([r["id"] for r in rs], [r["ratio"] for r in rs], color="tab:blue")
        ax.axhline(1.0, color="grey", lw=1)
        ax.set_ylabel("ours ÷ upstream (median)")
        ax.set_title("derper (Rust) ÷ upstream derper, same run (T3, T7, R1, R2: lower is better)")
        for i, r in enumerate(rs):
            ax.text(i, r["ratio"], f"{r['ratio']:.2f}×", ha="center", va="bottom", fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{outdir}/ratios.png", dpi=110)
        plt.close(fig)
        made.append("ratios.png")
    fig, axs = plt.subplots(1, 6, figsize=(18, 3.2))
    for ax, (key, path, label) in zip(axs, [("tput_1400", "delivered_pps", "1400 B pkt/s"),
                                            ("tput_64", "delivered_pps", "64 B pkt/s"),
                                            ("lat80", "latency.p99_us", "p99 µs at 80 %"),
                                            ("rc_20k", "server_cpu_us_per_pkt", "real clients 20 k: µs/pkt"),
                                            ("rc_60k", "server_cpu_us_per_pkt", "real clients 60 k: µs/pkt"),
                                            ("rc_cap", "capacity_pps", "real clients: capacity pkt/s")]):
        for i, side in enumerate(["ours", "upstream"]):
            ys = [get(x, path) for x in results.get(key, {}).get(side, [])]
            ys = [y for y in ys if y is not None]
            ax.scatter([i] * len(ys), ys, alpha=0.7)
        ax.set_xticks([0, 1], ["ours", "upstream"])
        ax.set_title(label, fontsize=9)
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(f"{outdir}/runs.png", dpi=110)
    plt.close(fig)
    made.append("runs.png")
    return made


def render(outdir):
    """Recomputes the summary rows, results.md and the plots of a finished run (same runs, same
    metadata), e.g. after a row was added to METRICS."""
    with open(f"{outdir}/results.json") as f:
        data = json.load(f)
    meta, results = data["meta"], data["runs"]
    rows = summarize(results, meta["cap_up"])
    with open(f"{outdir}/results.json", "w") as f:
        json.dump(dict(meta=meta, summary=rows, runs=results), f, indent=1)
    md = markdown(meta, rows)
    with open(f"{outdir}/results.md", "w") as f:
        f.write(md)
    made = plots(outdir, rows, results)
    print(md)
    log(f"re-rendered {outdir}/results.json, results.md, {', '.join(made) or 'no plots'}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ours", required="--render" not in sys.argv)
    p.add_argument("--upstream", required="--render" not in sys.argv)
    p.add_argument("--upstream-version", required="--render" not in sys.argv)
    p.add_argument("--bench", required="--render" not in sys.argv)
    p.add_argument("--out", required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--only", help="comma-separated workload keys (debugging)")
    p.add_argument("--command", default="scripts/bench")
    p.add_argument("--interop", required="--render" not in sys.argv, help="derpinterop built against the newest tailscale.com (load subcommand)")
    p.add_argument("--perf", default="", help="perf binary for the relays' system call counts (real-client rows)")
    p.add_argument("--fifo", action="store_true",
                   help="run relays and load generators under SCHED_FIFO priority 1 (chrt -f 1): a shared machine")
    p.add_argument("--render", action="store_true",
                   help="no runs: recompute the summary, results.md and plots from --out/results.json")
    args = p.parse_args()
    if args.render:
        render(args.out)
        return
    if args.fifo:
        RT_PREFIX[:] = ["chrt", "-f", "1"]
    if args.smoke:
        args.runs = min(args.runs, 1)
        common = ["--warmup", "0.2", "--duration", "0.3"]
    else:
        common = ["--warmup", "1", "--duration", "4"]
    if os.cpu_count() < 2:
        args.no_pin = True
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="derp-bench-")
    os.makedirs(f"{work}/certs")
    relays = [Relay("ours", args.ours, work, not args.no_pin),
              Relay("upstream", args.upstream, work, not args.no_pin)]
    meta = dict(run_meta(args.command, args.upstream_version), runs=args.runs, smoke=args.smoke,
                pinned=not args.no_pin, fifo=args.fifo)
    results, counter = {}, [0]
    only = set(args.only.split(",")) if args.only else None
    args.only_set = only
    wa = [w for w in workloads(args.smoke) if not only or w[0] in only]
    wm = [w for w in mesh_workloads() if not only or w[0] in only]
    meshes = []
    if wm:
        meshdir = f"{work}/meshcerts"
        out = subprocess.run([args.bench, "mesh-certs", "--dir", meshdir], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"derp-bench mesh-certs failed: {out.stderr.strip()[-2000:]}")
        psk = f"{work}/mesh.psk"
        with open(psk, "w") as f:
            f.write(os.urandom(32).hex() + "\n")
        meshes = [MeshPair("ours", args.ours, work, not args.no_pin, meshdir, psk),
                  MeshPair("upstream", args.upstream, work, not args.no_pin, meshdir, psk)]
    if args.smoke:
        for relay in relays + meshes:
            relay.start()
    try:
        run_phase(args, relays, wa, common, results, counter)
        run_phase(args, meshes, wm, common, results, counter)
        cap_up = median([get(x, "delivered_pps") for x in results.get("tput_1400", {}).get("upstream", [])])
        if cap_up is None:
            cap_up = 2000.0 if args.smoke else 50000.0
        wb = [w for w in workloads(args.smoke, cap_up) if not only or w[0] in only]
        run_phase(args, relays, wb, common, results, counter)
        run_rc_phase(args, relays, common, results, counter)
    finally:
        if args.smoke:
            for relay in relays + meshes:
                relay.stop()
    meta["finished"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    meta["loadavg_after"] = open("/proc/loadavg").read().split()[:3]
    meta["cap_up"] = cap_up
    meta["syscall_source"] = ("`perf stat -e raw_syscalls:sys_enter -p PID` attached for the window"
                              if args.perf else "not counted (no perf)")
    rows = summarize(results, cap_up)
    with open(f"{args.out}/results.json", "w") as f:
        json.dump(dict(meta=meta, summary=rows, runs=results), f, indent=1)
    md = markdown(meta, rows)
    with open(f"{args.out}/results.md", "w") as f:
        f.write(md)
    made = plots(args.out, rows, results)
    print(md)
    log(f"wrote {args.out}/results.json, results.md, {', '.join(made) or 'no plots'}")


if __name__ == "__main__":
    main()
