#!/usr/bin/env python3
"""keygate's load harness: keygate against its own pass-through build, the upstream direct, and
nginx doing API-key auth with a key map, side by side in one run on this machine.

Everything runs on loopback: a minimal hyper upstream (HTTP/1.1 only), then each target in turn,
interleaved over rounds (A B C D, A B C D, ...) so drift hits every target alike; medians are
reported, and for the nginx targets also each round's own ratio (the spread a median hides).
Besides requests/s and latency it reads the CPU time the proxy process(es) spent from /proc,
which varies far less than requests/s on a box the load generator shares. Groups:

    h1      wrk (HTTP/1.1, keep-alive) at 1, 16, 64, 128 and 256 connections against the
            upstream direct, the floor (a minimal hyper proxy, examples/bench_floor.rs), the
            pass-through build, keygate with real keys, nginx with a key map, and nginx with a
            key map that also sets the headers keygate sets; the 401 path of keygate and nginx
            at 16 and 128; and at 16, a new connection for every request (Connection: close)
            through the floor, the pass-through, keygate and nginx
    h2      h2load, cleartext HTTP/2 with prior knowledge (h2c), 16 and 64 connections with
            10 streams each, against pass-through, keygate and nginx
    tls     the same three with TLS on the listener, one self-signed ECDSA P-256 certificate
            for all: wrk over https at 16 and 128 connections, h2load over TLS (ALPN h2) at
            16 connections × 10 streams
    upload  a 1 GiB upload streamed through a freshly started keygate (real key) to an upstream
            that reads and discards it: throughput and keygate's peak resident memory (VmHWM)

The upstream side stays HTTP/1.1 for every target. A full run takes about fifteen minutes.

    python3 benches/load/harness.py                  # everything, writes benches/RESULTS.md
    python3 benches/load/harness.py --quick          # one round, short runs (smoke test)
    python3 benches/load/harness.py --only h2,tls    # a subset (printed, RESULTS.md untouched)
    python3 benches/load/harness.py --pgo            # also keygate's profile-guided build (h1)
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import ssl
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
GROUPS = ("h1", "h2", "tls", "upload")
PASS_THROUGH, KEYGATE, NGINX = "pass-through (keygate, no auth)", "keygate", "nginx + key map"
FLOOR = "hyper floor (no keygate code)"
NGINX_SAME = "nginx + key map, keygate's headers"
KEYGATE_PGO = "keygate, PGO build"
UPLOAD_TARGET_MB = 64
CHURN_CONNS = 16


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


def wait_ready(admin_port):
    wait_port(admin_port)
    for _ in range(200):
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz").status == 200:
                return
        except Exception:
            time.sleep(0.05)
    raise SystemExit(f"keygate on admin port {admin_port} never became ready")


def keygate_config(port, admin, db, up_port, tls=None):
    """keygate's configuration for a bench: one route for everything to the upstream, access
    log off; `tls` is (certificate, key) files for the listener."""
    tls_section = f'[proxy.tls]\ncert_file = "{tls[0]}"\nkey_file = "{tls[1]}"\n' if tls else ""
    return f"""
[proxy]
listen = "127.0.0.1:{port}"
{tls_section}[admin]
listen = "127.0.0.1:{admin}"
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
"""


def bad_key_of(key):
    """The harness's bad key: one secret character of `key` changed, so its checksum fails and
    keygate refuses it before any lookup."""
    return key[:9] + ("A" if key[9] != "A" else "B") + key[10:]


def self_signed_cert(cert, key):
    """A self-signed ECDSA P-256 certificate for localhost and 127.0.0.1, written to `cert` and
    `key` (PEM)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)


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


def proc_status_kib(pid, field):
    """A `kB` field of /proc/PID/status (VmRSS, VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"no {field} in /proc/{pid}/status")


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
    def __init__(self, name, port, pids_fn, headers, scheme="http"):
        self.name, self.port, self.pids_fn, self.headers = name, port, pids_fn, headers
        self.scheme = scheme

    def url(self, path="/bench"):
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"


def run_wrk(target, conns, duration, lua):
    threads = 1 if conns == 1 else 2
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency", "-s", str(lua)]
    for h in target.headers:
        cmd += ["-H", h]
    cmd.append(target.url())
    pids = target.pids_fn()
    before = cpu_ticks(pids)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after = cpu_ticks(pids)
    line = next(l for l in out.splitlines() if l.startswith("JSON "))
    r = json.loads(line[5:])
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["cpu_us_per_req"] = ((after - before) / CLK_TCK * 1e6 / r["requests"]) if pids and r["requests"] else None
    return r


H2LOAD_TIME = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def h2load_ms(text):
    """h2load's durations ("143us", "18.63ms", "1.02s") in milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"unexpected h2load duration {text!r}")
    return float(m.group(1)) * H2LOAD_TIME[m.group(2)]


def run_h2load(target, conns, streams, duration=None, requests=None):
    """One h2load run, timed (-D) or counted (-n). h2load speaks h2c with prior knowledge to an
    http:// URL and negotiates h2 by ALPN for https://. It reports the mean, sd and max of the
    request time, no percentiles."""
    cmd = ["h2load", f"-c{conns}", f"-m{streams}", f"-t{min(2, conns)}"]
    cmd += [f"-D{duration}"] if duration else [f"-n{requests}"]
    for h in target.headers:
        name, value = h.split(":", 1)
        cmd += ["-H", f"{name.lower()}:{value}"]
    cmd.append(target.url())
    pids = target.pids_fn()
    before = cpu_ticks(pids)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after = cpu_ticks(pids)
    r = {}
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("finished in"):
            r["rps"] = float(re.search(r"([\d.]+) req/s", line).group(1))
        elif line.startswith("requests:"):
            for count, what in re.findall(r"(\d+) (\w+)", line):
                r[what] = int(count)
        elif line.startswith("status codes:"):
            for count, what in re.findall(r"(\d+) (\dxx)", line):
                r[what] = int(count)
        elif line.startswith("time for request:"):
            lo, hi, mean, sd = line.split(":", 1)[1].split()[:4]
            r["mean"], r["sd"], r["max"] = h2load_ms(mean), h2load_ms(sd), h2load_ms(hi)
    if "rps" not in r or "done" not in r or "mean" not in r:
        raise SystemExit(f"cannot read h2load's output:\n{out}")
    r["requests"] = r["done"]
    r["errors"] = r.get("failed", 0) + r.get("errored", 0) + r.get("timeout", 0)
    # From the status-code line: in timed mode (-D) `done` and the 2xx count can differ by the
    # requests in flight when the clock ran out.
    r["non2xx"] = r.get("3xx", 0) + r.get("4xx", 0) + r.get("5xx", 0)
    r["cpu_us_per_req"] = ((after - before) / CLK_TCK * 1e6 / r["requests"]) if pids and r["requests"] else None
    return r


def tls_session(port):
    """Protocol, cipher and ALPN an OpenSSL client (Python's) negotiates with the listener."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            return f"{s.version()} {s.cipher()[0]}, ALPN {s.selected_alpn_protocol()}"


def upload(port, size, headers):
    """POSTs `size` zero bytes to /discard with a Content-Length, streamed in 1 MiB writes, and
    reads the answer: (status, body, seconds from the first byte sent to the last received)."""
    head = f"POST /discard HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {size}\r\n"
    head += "Content-Type: application/octet-stream\r\nConnection: close\r\n"
    head += "".join(f"{h}\r\n" for h in headers) + "\r\n"
    chunk = memoryview(bytes(1 << 20))
    with socket.create_connection(("127.0.0.1", port)) as s:
        started = time.perf_counter()
        s.sendall(head.encode())
        sent = 0
        while sent < size:
            n = min(len(chunk), size - sent)
            s.sendall(chunk[:n])
            sent += n
        answer = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            answer += data
        elapsed = time.perf_counter() - started
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    body = answer.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in answer else b""
    return status, body, elapsed


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt_cpu(v):
    return f"{v:.1f}" if v is not None else "—"


def per_round(results, a, b, conns, field):
    """`a`'s figure over `b`'s, round by round. A round runs every target back to back, so each
    ratio compares two runs less than a minute apart, where the medians compare whole columns."""
    ra, rb = results.get((a, conns), []), results.get((b, conns), [])
    return [x[field] / y[field] for x, y in zip(ra, rb) if x.get(field) and y.get(field)]


def spread(ratios, want_low):
    """`median (lowest–highest), k/n` where k counts the rounds on the target's side of 1.0."""
    if not ratios:
        return "—"
    ok = sum(1 for r in ratios if (r <= 1.0 if want_low else r >= 1.0))
    return f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}), {ok}/{len(ratios)}"


def wrk_rows(results, conns_list, targets):
    """Medians per (target, conns) and the markdown rows of the HTTP/1.1-style table."""
    summary, lines = {}, []
    for conns in conns_list:
        for t in targets:
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
            lines.append(f"| {conns} | {t.name} | {row['rps']:,.0f} | {row['p50']:.2f} | {row['p99']:.2f} | "
                         f"{row['p999']:.2f} | {fmt_cpu(row['cpu'])} | {row['errors']} |")
    return summary, lines


def h2_table(results, settings, targets, key_prefix):
    """The HTTP/2 table (medians of req/s, mean, sd; max over all rounds) and its ratios."""
    lines = [
        "| conns × streams | target | req/s | mean ms | sd ms | max ms | CPU µs/req | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    summary = {}
    for c, m in settings:
        for t in targets:
            runs = results.get((key_prefix, t.name, c, m))
            if not runs:
                continue
            row = {
                "rps": med([r["rps"] for r in runs]),
                "mean": med([r["mean"] for r in runs]),
                "sd": med([r["sd"] for r in runs]),
                "max": max(r["max"] for r in runs),
                "cpu": med([r["cpu_us_per_req"] for r in runs]),
                "errors": sum(r["errors"] + r["non2xx"] for r in runs),
            }
            summary[(t.name, c, m)] = row
            lines.append(f"| {c} × {m} | {t.name} | {row['rps']:,.0f} | {row['mean']:.2f} | {row['sd']:.2f} | "
                         f"{row['max']:.2f} | {fmt_cpu(row['cpu'])} | {row['errors']} |")
    lines += ["", "Ratios (same run):", "",
              "| conns × streams | keygate / pass-through req/s | keygate − pass-through CPU µs/req | keygate / nginx req/s | keygate / nginx CPU | keygate mean / nginx mean |",
              "|---:|---:|---:|---:|---:|---:|"]
    for c, m in settings:
        kg, pt, ng = (summary.get((n, c, m)) for n in (KEYGATE, PASS_THROUGH, NGINX))
        if kg and pt and ng:
            lines.append(f"| {c} × {m} | {kg['rps'] / pt['rps']:.3f} | {kg['cpu'] - pt['cpu']:+.2f} | "
                         f"{kg['rps'] / ng['rps']:.3f} | {kg['cpu'] / ng['cpu']:.3f} | {kg['mean'] / ng['mean']:.3f} |")
    return lines


def parse_settings(text):
    """"16x10,64x10" → [(16, 10), (64, 10)]: connections × concurrent streams per connection."""
    return [tuple(int(n) for n in s.split("x")) for s in text.split(",") if s]


def main():
    started = time.time()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {','.join(GROUPS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=4, help="seconds per wrk/h2load run")
    ap.add_argument("--conns", default="1,16,64,128,256", help="HTTP/1.1 connection counts")
    ap.add_argument("--h2", default="16x10,64x10", help="HTTP/2 connections x streams")
    ap.add_argument("--tls-conns", default="16,128", help="HTTP/1.1-over-TLS connection counts")
    ap.add_argument("--tls-h2", default="16x10", help="HTTP/2-over-TLS connections x streams ('' for none)")
    ap.add_argument("--upload-mib", type=int, default=1024)
    ap.add_argument("--keys", type=int, default=10000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pgo", action="store_true",
                    help="also measure keygate built with profile-guided optimisation (benches/load/pgo.py; "
                         "adds two release builds to the run)")
    ap.add_argument("--out", default=str(ROOT / "benches" / "RESULTS.md"))
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.duration, args.conns, args.keys = 1, 2, "16", 200
        args.h2, args.tls_conns = "16x10", "16"
    groups = [g for g in args.only.split(",") if g]
    unknown = set(groups) - set(GROUPS)
    if unknown:
        raise SystemExit(f"unknown group(s) {', '.join(sorted(unknown))}; choose from {', '.join(GROUPS)}")
    conns_list = [int(c) for c in args.conns.split(",")] if "h1" in groups else []
    h2_settings = parse_settings(args.h2) if "h2" in groups else []
    tls_conns = [int(c) for c in args.tls_conns.split(",") if c] if "tls" in groups else []
    tls_h2 = parse_settings(args.tls_h2) if "tls" in groups else []
    needs_nginx = bool(conns_list or h2_settings or tls_conns or tls_h2)
    for tool, wanted in [("wrk", conns_list or tls_conns), ("h2load", h2_settings or tls_h2),
                         ("openssl", tls_conns or tls_h2 or needs_nginx)]:
        if wanted and not shutil.which(tool):
            raise SystemExit(f"{tool} is required: apt-get install -y wrk nghttp2-client nginx openssl")
    nginx_bin = shutil.which("nginx") or "/usr/sbin/nginx"
    if needs_nginx and not Path(nginx_bin).exists():
        raise SystemExit("nginx is required: apt-get install -y nginx")

    print("building release binaries ...", file=sys.stderr)
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "keygate", "--example", "bench_upstream",
                    "--example", "bench_seed", "--example", "bench_floor"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "--quiet", "--features", "bench-passthrough",
                    "--example", "bench_passthrough"], cwd=ROOT, check=True)
    release = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
    pgo_keygate = None
    if args.pgo and conns_list:
        from pgo import build as pgo_build
        pgo_keygate = pgo_build()

    work = Path(tempfile.mkdtemp(prefix="keygate-bench-"))
    procs = []

    def spawn(cmd, log=None):
        log = log or Path(cmd[0]).name
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / f"{log}.log", "ab"))
        procs.append(p)
        return p

    def stop(p):
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        procs.remove(p)

    cert, cert_key = work / "cert.pem", work / "key.pem"

    def start_keygate(name, tls=False, binary=None):
        """keygate (`binary`, the release build by default) with the seeded database and one
        route to the upstream; (process, port)."""
        port, admin = free_port(), free_port()
        config = work / f"{name}.toml"
        config.write_text(keygate_config(port, admin, db, up_port, (cert, cert_key) if tls else None))
        p = spawn([str(binary or release / "keygate"), "--config", str(config), "serve"], log=name)
        wait_ready(admin)
        return p, port

    def start_passthrough(tls=False):
        port = free_port()
        extra = [str(cert), str(cert_key)] if tls else []
        p = spawn([str(release / "examples" / "bench_passthrough"), f"127.0.0.1:{port}",
                   f"http://127.0.0.1:{up_port}"] + extra, log="bench_passthrough" + ("-tls" if tls else ""))
        wait_port(port)
        return p, port

    try:
        up_port = free_port()
        upstream = spawn([str(release / "examples" / "bench_upstream"), f"127.0.0.1:{up_port}"])
        wait_port(up_port)

        db = f"sqlite://{work / 'bench.db'}"
        keys_file = work / "keys.txt"
        print(f"seeding {args.keys} keys ...", file=sys.stderr)
        subprocess.run([str(release / "examples" / "bench_seed"), db, str(args.keys), str(keys_file)], check=True)
        keys = keys_file.read_text().split()
        key = keys[len(keys) // 2]
        key_header = f"X-Api-Key: {key}"
        bad_key = bad_key_of(key)
        nginx_pids = lambda: [nginx.pid] + children(nginx.pid)  # noqa: E731

        if needs_nginx:
            # One certificate and key for every TLS listener, so the comparison is of the servers.
            self_signed_cert(cert, cert_key)
            ng_port, ng_h2c_port, ng_tls_port, ng_same_port = free_port(), free_port(), free_port(), free_port()
            key_map = "\n".join(f'        "{k}" "bench";' for k in keys)
            (work / "nginx.conf").write_text(
                (HERE / "nginx.conf.in").read_text()
                .replace("@WORK@", str(work)).replace("@PORT@", str(ng_port))
                .replace("@H2C_PORT@", str(ng_h2c_port)).replace("@TLS_PORT@", str(ng_tls_port))
                .replace("@SAME_HEADERS_PORT@", str(ng_same_port))
                .replace("@SCOPES@", key_map)
                .replace("@CERT@", str(cert)).replace("@KEY@", str(cert_key))
                .replace("@UPSTREAM@", f"127.0.0.1:{up_port}").replace("@KEYS@", key_map))
            nginx = spawn([nginx_bin, "-c", str(work / "nginx.conf"), "-p", str(work), "-g", "daemon off;"])
            for port in (ng_port, ng_h2c_port, ng_tls_port, ng_same_port):
                wait_port(port)

        lua = HERE / "report.lua"
        targets, rejects, churn, h2_targets, tls_targets = [], [], [], [], []
        if conns_list or h2_settings:
            keygate, kg_port = start_keygate("keygate")
            passthrough, pt_port = start_passthrough()
            fl_port = free_port()
            floor = spawn([str(release / "examples" / "bench_floor"), f"127.0.0.1:{fl_port}", f"127.0.0.1:{up_port}"])
            wait_port(fl_port)
            targets = [
                Target("upstream direct", up_port, lambda: [upstream.pid], []),
                Target(FLOOR, fl_port, lambda: [floor.pid], [key_header]),
                Target(PASS_THROUGH, pt_port, lambda: [passthrough.pid], [key_header]),
                Target(KEYGATE, kg_port, lambda: [keygate.pid], [key_header]),
                Target(NGINX, ng_port, nginx_pids, [key_header]),
                Target(NGINX_SAME, ng_same_port, nginx_pids, [key_header]),
            ]
            if pgo_keygate:
                keygate_pgo, kg_pgo_port = start_keygate("keygate-pgo", binary=pgo_keygate)
                targets.insert(4, Target(KEYGATE_PGO, kg_pgo_port, lambda: [keygate_pgo.pid], [key_header]))
            # Clients that open a connection for each request (`Connection: close`): what a
            # connection costs, where keep-alive hides it.
            churn = [Target(f"{t.name}, new connection per request", t.port, t.pids_fn,
                            t.headers + ["Connection: close"])
                     for t in targets if t.name in (FLOOR, PASS_THROUGH, KEYGATE, KEYGATE_PGO, NGINX)]
            rejects = [
                Target("keygate 401 (bad key)", kg_port, lambda: [keygate.pid], [f"X-Api-Key: {bad_key}"]),
                Target("nginx 401 (bad key)", ng_port, nginx_pids, [f"X-Api-Key: {bad_key}"]),
            ]
            if pgo_keygate:
                rejects.insert(1, Target("keygate 401 (bad key), PGO build", kg_pgo_port,
                                         lambda: [keygate_pgo.pid], [f"X-Api-Key: {bad_key}"]))
            # nginx's `http2` listen parameter without `ssl` serves only h2c: its own port.
            h2_targets = [
                Target(PASS_THROUGH, pt_port, lambda: [passthrough.pid], [key_header]),
                Target(KEYGATE, kg_port, lambda: [keygate.pid], [key_header]),
                Target(NGINX, ng_h2c_port, nginx_pids, [key_header]),
            ]
        tls_sessions = {}
        if tls_conns or tls_h2:
            keygate_tls, kg_tls_port = start_keygate("keygate-tls", tls=True)
            passthrough_tls, pt_tls_port = start_passthrough(tls=True)
            tls_targets = [
                Target(PASS_THROUGH, pt_tls_port, lambda: [passthrough_tls.pid], [key_header], "https"),
                Target(KEYGATE, kg_tls_port, lambda: [keygate_tls.pid], [key_header], "https"),
                Target(NGINX, ng_tls_port, nginx_pids, [key_header], "https"),
            ]
            tls_sessions = {t.name: tls_session(t.port) for t in tls_targets}

        # Sanity: every target answers as expected before measuring.
        for t in (targets + churn if conns_list else []) + (tls_targets if tls_conns else []):
            r = run_wrk(t, 1, 1, lua)
            assert r["non2xx"] == 0 and r["errors"] == 0, f"{t.name} ({t.scheme}) is not answering 200: {r}"
        for t in (h2_targets if h2_settings else []) + (tls_targets if tls_h2 else []):
            r = run_h2load(t, 1, 1, requests=200)
            assert r.get("2xx") == 200 and r["errors"] == 0, f"{t.name} ({t.scheme}) is not answering 200 over h2: {r}"

        results = {}
        for rnd in range(args.rounds):
            tag = f"round {rnd + 1}/{args.rounds}"
            for conns in conns_list:
                for t in targets + (rejects if conns in (16, 128) else []):
                    print(f"{tag}  h1 {conns:>3} conns  {t.name}", file=sys.stderr)
                    results.setdefault((t.name, conns), []).append(run_wrk(t, conns, args.duration, lua))
            for c, m in h2_settings:
                for t in h2_targets:
                    print(f"{tag}  h2c {c}×{m}  {t.name}", file=sys.stderr)
                    results.setdefault(("h2", t.name, c, m), []).append(run_h2load(t, c, m, duration=args.duration))
            for conns in tls_conns:
                for t in tls_targets:
                    print(f"{tag}  https h1 {conns:>3} conns  {t.name}", file=sys.stderr)
                    results.setdefault(("tls", t.name, conns), []).append(run_wrk(t, conns, args.duration, lua))
            for c, m in tls_h2:
                for t in tls_targets:
                    print(f"{tag}  https h2 {c}×{m}  {t.name}", file=sys.stderr)
                    results.setdefault(("tls-h2", t.name, c, m), []).append(run_h2load(t, c, m, duration=args.duration))

        # After every other run: each of these leaves tens of thousands of closed connections in
        # TIME_WAIT on loopback for a minute, which must not weigh on the runs above.
        for rnd in range(args.rounds if CHURN_CONNS in conns_list else 0):
            for t in churn:
                print(f"round {rnd + 1}/{args.rounds}  h1 {CHURN_CONNS:>3} conns  {t.name}", file=sys.stderr)
                results.setdefault((t.name, CHURN_CONNS), []).append(run_wrk(t, CHURN_CONNS, args.duration, lua))

        upload_rows = None
        if "upload" in groups:
            upload_rows = measure_upload(args, up_port, key_header, start_keygate, stop)

        lines = [
            "# keygate load results",
            "",
            f"Machine: {machine()}. Loopback; load generator, proxies and upstream share the box.",
        ]
        if conns_list:
            lines += [
                f"wrk -t2 (-t1 at 1 connection), keep-alive, {args.duration}s per run, {args.rounds} interleaved "
                f"rounds, medians. keygate: release build, SQLite, {args.keys} keys in the table, access log off"
                + ("; \"keygate, PGO build\": the same with `benches/load/pgo.py`'s profile-guided build. " if pgo_keygate else ". ")
                + f"nginx: 2 workers, a {args.keys}-key `map`, upstream keepalive, access log off; "
                f"\"{NGINX_SAME}\" is the same nginx on a server that also sets what keygate sets: the key's "
                "account, prefix and scopes, X-Forwarded-For/-Proto/-Host and a request id both ways "
                "(`benches/load/nginx.conf.in`). CPU µs/req: user+system time of the proxy process(es) per "
                "request, from /proc (for the upstream direct, the upstream's own).",
                "",
                "| conns | target | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/req | errors |",
                "|---:|---|---:|---:|---:|---:|---:|---:|",
            ]
            summary, rows = wrk_rows(results, conns_list, targets + rejects)
            churn_summary, churn_rows = wrk_rows(results, [CHURN_CONNS], churn)
            lines += rows
            lines += ["", "Ratios (same run):", "",
                      "| conns | keygate / pass-through req/s | keygate − pass-through CPU µs/req | keygate / nginx req/s | keygate / nginx CPU | keygate p99 / nginx p99 |",
                      "|---:|---:|---:|---:|---:|---:|"]
            for conns in conns_list:
                kg = summary.get((KEYGATE, conns))
                pt = summary.get((PASS_THROUGH, conns))
                ng = summary.get((NGINX, conns))
                if kg and pt and ng:
                    lines.append(f"| {conns} | {kg['rps'] / pt['rps']:.3f} | {kg['cpu'] - pt['cpu']:+.2f} | "
                                 f"{kg['rps'] / ng['rps']:.3f} | {kg['cpu'] / ng['cpu']:.3f} | {kg['p99'] / ng['p99']:.3f} |")
            floor_lines = []
            for conns in conns_list:
                fl, ng = summary.get((FLOOR, conns)), summary.get((NGINX, conns))
                kg = summary.get((KEYGATE, conns))
                if fl and ng and kg:
                    floor_lines.append(f"| {conns} | {fl['rps'] / ng['rps']:.3f} | {fl['cpu'] / ng['cpu']:.3f} | "
                                       f"{kg['rps'] / fl['rps']:.3f} | {kg['cpu'] - fl['cpu']:+.2f} |")
            if floor_lines:
                lines += ["", "The floor of the stack: `examples/bench_floor.rs`, a minimal proxy of the same parts "
                          "(hyper 1.x server and client, a current-thread runtime per worker, an upstream connection "
                          "per client connection) with no routing, checks, header rewriting, timeouts or metrics:", "",
                          "| conns | floor / nginx req/s | floor / nginx CPU | keygate / floor req/s | keygate − floor CPU µs/req |",
                          "|---:|---:|---:|---:|---:|"] + floor_lines
            same_lines = []
            for conns in conns_list:
                kg, ns = summary.get((KEYGATE, conns)), summary.get((NGINX_SAME, conns))
                if kg and ns:
                    same_lines.append(f"| {conns} | {kg['rps'] / ns['rps']:.3f} | {kg['cpu'] / ns['cpu']:.3f} | "
                                      f"{kg['p99'] / ns['p99']:.3f} |")
            if same_lines:
                lines += ["", "keygate against nginx handing the upstream the same headers (same run):", "",
                          "| conns | keygate / nginx req/s | keygate / nginx CPU | keygate p99 / nginx p99 |",
                          "|---:|---:|---:|---:|"] + same_lines
            pgo_lines = []
            for conns in conns_list:
                pg, kg = summary.get((KEYGATE_PGO, conns)), summary.get((KEYGATE, conns))
                ng, ns = summary.get((NGINX, conns)), summary.get((NGINX_SAME, conns))
                if pg and kg and ng and ns:
                    pgo_lines.append(f"| {conns} | {pg['rps'] / ng['rps']:.3f} | {pg['cpu'] / ng['cpu']:.3f} | "
                                     f"{pg['p99'] / ng['p99']:.3f} | {pg['rps'] / ns['rps']:.3f} | "
                                     f"{pg['cpu'] / ns['cpu']:.3f} | {pg['cpu'] - kg['cpu']:+.2f} |")
            if pgo_lines:
                lines += ["", "keygate's profile-guided build (`benches/load/pgo.py`: the same code, trained on this "
                          "harness's kinds of traffic) against nginx, and against the plain release build (same run):", "",
                          "| conns | PGO / nginx req/s | PGO / nginx CPU | PGO p99 / nginx p99 | PGO / nginx with keygate's headers req/s | CPU | PGO − release build CPU µs/req |",
                          "|---:|---:|---:|---:|---:|---:|---:|"] + pgo_lines
            round_lines = []
            for conns in (16, 128):
                for build, name in (("keygate", KEYGATE), ("keygate, PGO build", KEYGATE_PGO)):
                    if (name, conns) not in results or (NGINX, conns) not in results:
                        continue
                    cells = [spread(per_round(results, name, NGINX, conns, "rps"), want_low=False),
                             spread(per_round(results, name, NGINX, conns, "cpu_us_per_req"), want_low=True),
                             spread(per_round(results, name, NGINX, conns, "p99"), want_low=True) if conns == 16 else "—"]
                    round_lines.append(f"| {conns} | {build} | " + " | ".join(cells) + " |")
            if round_lines and args.rounds > 1:
                lines += ["", "The nginx targets round by round: each round runs every target back to back, so a "
                          "round's ratio compares like with like. Median (lowest–highest) of the rounds' ratios, "
                          "and in how many rounds the target held (req/s ≥ 1.0; CPU and p99 ≤ 1.0):", "",
                          "| conns | build | / nginx req/s | / nginx CPU | / nginx p99 |",
                          "|---:|---|---:|---:|---:|"] + round_lines
            for conns in (16, 128):
                for build, suffix in (("keygate", ""), ("keygate's PGO build", ", PGO build")):
                    rej = summary.get((f"keygate 401 (bad key){suffix}", conns))
                    up = summary.get(("upstream direct", conns))
                    if rej and up:
                        lines.append("")
                        lines.append(f"401 path at {conns} conns: {build} rejects at {rej['rps']:,.0f} req/s, "
                                     f"{rej['rps'] / up['rps']:.2f}× the upstream's own direct rate, using "
                                     f"{fmt_cpu(rej['cpu'])} µs of CPU per refusal against the upstream's "
                                     f"{fmt_cpu(up['cpu'])} µs per answer.")
            if churn_rows:
                lines += ["", f"A new connection for every request (`Connection: close`, {CHURN_CONNS} at a time, "
                          f"{args.rounds} interleaved rounds after all other runs): each request pays a TCP handshake and teardown with the proxy; the floor "
                          "also opens an upstream connection for it (an HTTP/1 client's upstream connection is its "
                          "own), keygate and its pass-through take the idle one a finished client connection left "
                          "(offered for 2 s), nginx takes one from its keepalive pool:", "",
                          "| conns | target | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/req | errors |",
                          "|---:|---|---:|---:|---:|---:|---:|---:|"] + churn_rows
                ng = churn_summary.get((f"{NGINX}, new connection per request", CHURN_CONNS))
                for build, name in (("keygate", KEYGATE), ("keygate's PGO build", KEYGATE_PGO)):
                    kg = churn_summary.get((f"{name}, new connection per request", CHURN_CONNS))
                    if kg and ng:
                        lines += ["", f"{build} / nginx with a new connection per request: "
                                  f"{kg['rps'] / ng['rps']:.3f}× req/s at {kg['cpu'] / ng['cpu']:.3f}× the CPU per request."]
        else:
            summary = {}
        if h2_settings:
            lines += [
                "",
                "## HTTP/2, cleartext (h2c, prior knowledge)",
                "",
                f"h2load -t2, C connections × M concurrent streams each, {args.duration}s per run (-D), in the same "
                f"interleaved rounds; medians of req/s, mean and sd, max is the largest of all rounds. h2load reports "
                "the mean, sd and max of the request time, no percentiles. The upstream stays HTTP/1.1: keygate "
                "forwards HTTP/2 clients' requests through its shared per-worker upstream pool (HTTP/1 clients get "
                "an upstream connection of their own), nginx through its `keepalive` pool; nginx serves h2c on a "
                "`listen ... http2` port of its own, on a second server with `keepalive_requests` raised to "
                "1,000,000 (at the default 1,000 nginx ends each h2 connection with GOAWAY after 1,000 requests "
                "and h2load does not reconnect; keygate sets no such limit; the plain HTTP/1.1 server above keeps "
                "the default). No upstream-direct row: the upstream speaks HTTP/1.1 only. "
                "errors: failed, errored, timed-out and non-2xx responses.",
                "",
            ]
            lines += h2_table(results, h2_settings, h2_targets, "h2")
        if tls_conns or tls_h2:
            sessions = sorted(set(tls_sessions.values()))
            negotiated = (f"all three: {sessions[0]}" if len(sessions) == 1 else
                          "; ".join(f"{n}: {s}" for n, s in tls_sessions.items()))
            lines += [
                "",
                "## TLS on the listener",
                "",
                "One self-signed ECDSA P-256 certificate and key (openssl, per run) for all three; the upstream "
                f"side is plain HTTP/1.1. Negotiated with an OpenSSL client (Python's `ssl`), {negotiated}. keygate: "
                "`[proxy.tls]` (rustls, ring); pass-through: the same example given the same certificate; nginx: "
                "`listen ... ssl http2` on the second server (2 workers, `ssl_protocols TLSv1.2 TLSv1.3`, "
                "`ssl_session_cache shared:SSL:10m`, keep-alive, `keepalive_requests` 1,000,000). Clients connect "
                "once per run, so these are steady-state costs of the record layer, not of handshakes.",
            ]
            if tls_conns:
                lines += [
                    "",
                    f"HTTP/1.1 over TLS, wrk as above ({args.duration}s per run, same rounds, medians):",
                    "",
                    "| conns | target | req/s | p50 ms | p99 ms | p99.9 ms | CPU µs/req | errors |",
                    "|---:|---|---:|---:|---:|---:|---:|---:|",
                ]
                tls_results = {(k[1], k[2]): runs for k, runs in results.items() if k[0] == "tls"}
                tls_summary, rows = wrk_rows(tls_results, tls_conns, tls_targets)
                lines += rows
                lines += ["", "Ratios (same run); TLS cost: CPU µs/req over TLS minus the same target's plain HTTP/1.1 "
                          "figure at the same connection count:", "",
                          "| conns | keygate / pass-through req/s | keygate − pass-through CPU µs/req | keygate / nginx req/s | keygate / nginx CPU | keygate p99 / nginx p99 | keygate TLS cost µs/req | nginx TLS cost µs/req |",
                          "|---:|---:|---:|---:|---:|---:|---:|---:|"]
                for conns in tls_conns:
                    kg, pt, ng = (tls_summary.get((n, conns)) for n in (KEYGATE, PASS_THROUGH, NGINX))
                    if not (kg and pt and ng):
                        continue
                    kg_plain, ng_plain = summary.get((KEYGATE, conns)), summary.get((NGINX, conns))
                    kg_cost = f"{kg['cpu'] - kg_plain['cpu']:+.2f}" if kg_plain else "—"
                    ng_cost = f"{ng['cpu'] - ng_plain['cpu']:+.2f}" if ng_plain else "—"
                    lines.append(f"| {conns} | {kg['rps'] / pt['rps']:.3f} | {kg['cpu'] - pt['cpu']:+.2f} | "
                                 f"{kg['rps'] / ng['rps']:.3f} | {kg['cpu'] / ng['cpu']:.3f} | {kg['p99'] / ng['p99']:.3f} | "
                                 f"{kg_cost} | {ng_cost} |")
            if tls_h2:
                lines += ["", "HTTP/2 over TLS (ALPN h2), h2load as above:", ""]
                lines += h2_table(results, tls_h2, tls_targets, "tls-h2")
        if upload_rows:
            lines += ["", "## Streamed upload", ""] + upload_rows
        text = "\n".join(lines) + "\n"
        print(text)
        if args.quick or set(groups) != set(GROUPS):
            print(f"not written to {args.out}: only a full run of every group replaces its load section",
                  file=sys.stderr)
        else:
            # Replace only the load section; the other sections (micro-benchmarks, scenarios)
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
        print(f"harness finished in {time.time() - started:.0f}s", file=sys.stderr)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


def measure_upload(args, up_port, key_header, start_keygate, stop):
    """The upload group: the upstream direct for reference, then a keygate started for this
    alone, so its VmHWM (which cannot be reset) is the peak of its start plus one upload."""
    size = args.upload_mib << 20
    print(f"upload {args.upload_mib} MiB  upstream direct", file=sys.stderr)
    status, body, direct_s = upload(up_port, size, [])
    assert status == 200 and body == str(size).encode(), f"upstream direct upload: {status} {body[:200]!r}"

    keygate, port = start_keygate("keygate-upload")
    # One small request first: the key's cold verification and the upstream connection.
    status, body, _ = upload(port, 1, [key_header])
    assert status == 200 and body == b"1", f"keygate warm-up upload: {status} {body[:200]!r}"
    rss_before = proc_status_kib(keygate.pid, "VmRSS")
    hwm_before = proc_status_kib(keygate.pid, "VmHWM")
    ticks = cpu_ticks([keygate.pid])
    print(f"upload {args.upload_mib} MiB  keygate", file=sys.stderr)
    status, body, kg_s = upload(port, size, [key_header])
    cpu_s = (cpu_ticks([keygate.pid]) - ticks) / CLK_TCK
    hwm = proc_status_kib(keygate.pid, "VmHWM")
    rss_after = proc_status_kib(keygate.pid, "VmRSS")
    stop(keygate)
    assert status == 200 and body == str(size).encode(), f"keygate upload: {status} {body[:200]!r}"

    mib = size / (1 << 20)
    peak_mb = hwm * 1024 / 1e6
    verdict = "met" if peak_mb < UPLOAD_TARGET_MB else "**missed**"
    return [
        f"One {args.upload_mib} MiB POST (Content-Length, written in 1 MiB pieces by a Python socket client) "
        f"to an upstream path that reads the body to its end and discards it; the upstream answers with the "
        f"byte count, checked. keygate: a fresh process (same database, {args.keys} keys), one 1-byte request "
        f"first to warm the key and the upstream connection, then the upload. Peak RSS: VmHWM from "
        f"/proc/PID/status, which covers the start (key table load) as well. One run.",
        "",
        "| through | seconds | MiB/s | proxy CPU s | RSS before | peak RSS (VmHWM) | RSS after |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| upstream direct | {direct_s:.2f} | {mib / direct_s:,.0f} | — | — | — | — |",
        f"| keygate (real key) | {kg_s:.2f} | {mib / kg_s:,.0f} | {cpu_s:.2f} | {rss_before / 1024:.1f} MiB | "
        f"{hwm / 1024:.1f} MiB | {rss_after / 1024:.1f} MiB |",
        "",
        f"keygate's peak resident memory: {peak_mb:.1f} MB (target < {UPLOAD_TARGET_MB} MB: {verdict}); "
        f"{hwm_before / 1024:.1f} MiB peak before the upload.",
    ]


if __name__ == "__main__":
    main()
