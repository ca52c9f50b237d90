#!/usr/bin/env python3
"""keygate's load harness: keygate against its own pass-through build, the upstream direct, and
nginx doing API-key auth with a key map, side by side in one run on this machine.

Everything runs on loopback: a minimal hyper upstream, then each target in turn, driven by wrk
(HTTP/1.1, keep-alive) at several connection counts, interleaved over rounds (A B C D, A B C D,
...) so drift hits every target alike; medians are reported. Besides requests/s and latency
percentiles it reads the CPU time the proxy process(es) spent from /proc, which varies far less
than requests/s on a box the load generator shares.

    python3 benches/load/harness.py            # full run, writes benches/RESULTS.md
    python3 benches/load/harness.py --quick    # one round, short runs (smoke test)
"""

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout}s")


def cpu_ticks(pids):
    """utime+stime of the given processes and all their threads, in clock ticks."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (FileNotFoundError, IndexError):
            pass
    return total


def children(pid):
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(p.name))
    return out


def machine():
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return f"{os.cpu_count()} cores ({model}), {int(mem) // 1024 // 1024} GiB, Linux {platform.release()}"


class Target:
    def __init__(self, name, port, pids_fn, headers):
        self.name, self.port, self.pids_fn, self.headers = name, port, pids_fn, headers


def run_wrk(target, conns, duration, lua):
    threads = 1 if conns == 1 else 2
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency", "-s", str(lua)]
    for h in target.headers:
        cmd += ["-H", h]
    cmd.append(f"http://127.0.0.1:{target.port}/bench")
    pids = target.pids_fn()
    before = cpu_ticks(pids)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after = cpu_ticks(pids)
    line = next(l for l in out.splitlines() if l.startswith("JSON "))
    r = json.loads(line[5:])
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["cpu_us_per_req"] = ((after - before) / CLK_TCK * 1e6 / r["requests"]) if pids and r["requests"] else None
    return r


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=4)
    ap.add_argument("--conns", default="1,16,64,128,256")
    ap.add_argument("--keys", type=int, default=10000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benches" / "RESULTS.md"))
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration, args.conns, args.keys = 1, 2, "16", 200
    conns_list = [int(c) for c in args.conns.split(",")]
    for tool in ["wrk", "nginx"]:
        if not shutil.which(tool) and not Path("/usr/sbin/nginx").exists():
            raise SystemExit(f"{tool} is required: apt-get install -y wrk nginx")
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"

    print("building release binaries ...", file=sys.stderr)
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "keygate",
                    "--example", "bench_upstream", "--example", "bench_seed"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "--quiet", "--features", "bench-passthrough",
                    "--example", "bench_passthrough"], cwd=ROOT, check=True)
    release = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"

    work = Path(tempfile.mkdtemp(prefix="keygate-bench-"))
    procs = []

    def spawn(cmd, **kw):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / f"{Path(cmd[0]).name}.log", "ab"), **kw)
        procs.append(p)
        return p

    try:
        up_port = free_port()
        spawn([str(release / "examples" / "bench_upstream"), f"127.0.0.1:{up_port}"])
        wait_port(up_port)

        db = f"sqlite://{work / 'bench.db'}"
        keys_file = work / "keys.txt"
        print(f"seeding {args.keys} keys ...", file=sys.stderr)
        subprocess.run([str(release / "examples" / "bench_seed"), db, str(args.keys), str(keys_file)], check=True)
        keys = keys_file.read_text().split()
        key = keys[len(keys) // 2]

        kg_port, kg_admin = free_port(), free_port()
        config = work / "keygate.toml"
        config.write_text(f"""
[proxy]
listen = "127.0.0.1:{kg_port}"
[admin]
listen = "127.0.0.1:{kg_admin}"
[database]
url = "{db}"
[log]
filter = "warn"
access_log = false
[[routes]]
name = "bench"
path_prefix = "/"
upstream = "http://127.0.0.1:{up_port}"
scope = "bench"
""")
        keygate = spawn([str(release / "keygate"), "--config", str(config), "serve"])
        wait_port(kg_admin)
        for _ in range(200):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{kg_admin}/readyz").status == 200:
                    break
            except Exception:
                time.sleep(0.05)

        pt_port = free_port()
        passthrough = spawn([str(release / "examples" / "bench_passthrough"), f"127.0.0.1:{pt_port}",
                             f"http://127.0.0.1:{up_port}"])
        wait_port(pt_port)

        ng_port = free_port()
        key_map = "\n".join(f'        "{k}" "bench";' for k in keys)
        (work / "nginx.conf").write_text(
            (HERE / "nginx.conf.in").read_text()
            .replace("@WORK@", str(work)).replace("@PORT@", str(ng_port))
            .replace("@UPSTREAM@", f"127.0.0.1:{up_port}").replace("@KEYS@", key_map))
        nginx = spawn([nginx_bin, "-c", str(work / "nginx.conf"), "-p", str(work), "-g", "daemon off;"])
        wait_port(ng_port)

        key_header = f"X-Api-Key: {key}"
        bad_key = key[:9] + ("A" if key[9] != "A" else "B") + key[10:]
        targets = [
            Target("upstream direct", up_port, lambda: [], []),
            Target("pass-through (keygate, no auth)", pt_port, lambda: [passthrough.pid], [key_header]),
            Target("keygate", kg_port, lambda: [keygate.pid], [key_header]),
            Target("nginx + key map", ng_port, lambda: [nginx.pid] + children(nginx.pid), [key_header]),
        ]
        rejects = [
            Target("keygate 401 (bad key)", kg_port, lambda: [keygate.pid], [f"X-Api-Key: {bad_key}"]),
            Target("nginx 401 (bad key)", ng_port, lambda: [nginx.pid] + children(nginx.pid), [f"X-Api-Key: {bad_key}"]),
        ]
        lua = HERE / "report.lua"

        # Sanity: every target answers as expected before measuring.
        for t in targets:
            r = run_wrk(t, 1, 1, lua)
            assert r["non2xx"] == 0 and r["errors"] == 0, f"{t.name} is not answering 200: {r}"

        results = {}
        for rnd in range(args.rounds):
            for conns in conns_list:
                for t in targets + (rejects if conns in (16, 128) else []):
                    print(f"round {rnd + 1}/{args.rounds}  {conns:>3} conns  {t.name}", file=sys.stderr)
                    results.setdefault((t.name, conns), []).append(run_wrk(t, conns, args.duration, lua))

        lines = [
            "# keygate load results",
            "",
            f"Machine: {machine()}. Loopback; load generator, proxies and upstream share the box.",
            f"wrk -t2 (-t1 at 1 connection), keep-alive, {args.duration}s per run, {args.rounds} interleaved "
            f"rounds, medians. keygate: release build, SQLite, {args.keys} keys in the table, access log off. "
            f"nginx: 2 workers, a {args.keys}-key `map`, upstream keepalive, access log off. "
            "CPU µs/req: user+system time of the proxy process(es) per request, from /proc.",
            "",
            "| conns | target | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/req | errors |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
        summary = {}
        for conns in conns_list:
            for t in targets + rejects:
                runs = results.get((t.name, conns))
                if not runs:
                    continue
                row = {
                    "rps": med([r["rps"] for r in runs]),
                    "p50": med([r["p50"] for r in runs]) / 1000,
                    "p99": med([r["p99"] for r in runs]) / 1000,
                    "p999": med([r["p999"] for r in runs]) / 1000,
                    "cpu": med([r["cpu_us_per_req"] for r in runs]),
                    "errors": sum(r["errors"] for r in runs),
                }
                summary[(t.name, conns)] = row
                cpu = f"{row['cpu']:.1f}" if row["cpu"] is not None else "—"
                lines.append(f"| {conns} | {t.name} | {row['rps']:,.0f} | {row['p50']:.2f} | {row['p99']:.2f} | "
                             f"{row['p999']:.2f} | {cpu} | {row['errors']} |")
        lines += ["", "Ratios (same run):", "",
                  "| conns | keygate / pass-through req/s | keygate − pass-through CPU µs/req | keygate / nginx req/s | keygate / nginx CPU | keygate p99 / nginx p99 |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for conns in conns_list:
            kg = summary.get(("keygate", conns))
            pt = summary.get(("pass-through (keygate, no auth)", conns))
            ng = summary.get(("nginx + key map", conns))
            if kg and pt and ng:
                lines.append(f"| {conns} | {kg['rps'] / pt['rps']:.3f} | {kg['cpu'] - pt['cpu']:+.2f} | "
                             f"{kg['rps'] / ng['rps']:.3f} | {kg['cpu'] / ng['cpu']:.3f} | {kg['p99'] / ng['p99']:.3f} |")
        for conns in (16, 128):
            rej = summary.get(("keygate 401 (bad key)", conns))
            up = summary.get(("upstream direct", conns))
            if rej and up:
                lines.append("")
                lines.append(f"401 path at {conns} conns: keygate rejects at {rej['rps']:,.0f} req/s, "
                             f"{rej['rps'] / up['rps']:.2f}× the upstream's own direct rate.")
        text = "\n".join(lines) + "\n"
        print(text)
        if not args.quick:
            # Replace only the load table; the other sections (micro-benchmarks, scenarios)
            # are written by hand from their own commands.
            begin, end = "<!-- load:begin -->\n", "<!-- load:end -->\n"
            out = Path(args.out)
            old = out.read_text() if out.exists() else ""
            if begin in old and end in old:
                text = old[: old.index(begin)] + begin + text + end + old[old.index(end) + len(end):]
            else:
                text = begin + text + end + old
            out.write_text(text)
            print(f"written to {args.out}", file=sys.stderr)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
