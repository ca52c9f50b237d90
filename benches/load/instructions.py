#!/usr/bin/env python3
"""Instructions per request, by function: one target of the load harness run under callgrind.

The load harness measures time, which moves ±10-20 % between runs on a shared 2-core box.
callgrind counts the instructions a process executes, which for the same binary and the same
requests come out the same whatever else the machine does; this script is how the
instruction figures in benches/RESULTS.md were taken.

It starts the harness's upstream on loopback, then the chosen target under
`valgrind --tool=callgrind --separate-threads=yes`, warms it with keep-alive requests, zeroes the
counts, sends the measured requests over the same number of connections and dumps. It prints
the instructions per request of each thread that did real work and, for the threads that
served the requests, the functions' own (exclusive) instructions per request. `--cache-sim` adds
callgrind's cache simulation (I1/D1 misses per request; slower).

    python3 benches/load/instructions.py keygate               # a forwarded request, 16 connections
    python3 benches/load/instructions.py keygate --bad-key     # a refusal (401)
    python3 benches/load/instructions.py floor --conns 128
    python3 benches/load/instructions.py keygate --compare passthrough   # per-function difference
    python3 benches/load/instructions.py keygate --close --requests 4000  # a new connection each
    python3 benches/load/instructions.py keygate --binary target/pgo/release/keygate  # the PGO build
    python3 benches/load/instructions.py keygate --binary target/pgo/release/keygate --compare keygate

Targets: keygate (real keys, SQLite), passthrough (keygate's proxy code without the auth step),
floor (examples/bench_floor.rs) and upstream (the harness's upstream itself). Needs valgrind
(`apt-get install -y valgrind`). A run takes a minute or two per target.
"""

import argparse
import asyncio
import collections
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, bad_key_of, free_port, keygate_config, wait_port, wait_ready  # noqa: E402

TARGETS = ("keygate", "passthrough", "floor", "upstream")


async def drive(port, conns, requests, key, close=False):
    """`requests` keep-alive GETs of /bench over `conns` connections, each read to its end; with
    `close`, each on a new connection (`Connection: close`), `conns` at a time."""
    head = f"GET /bench HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Api-Key: {key}\r\n"
    head = (head + ("Connection: close\r\n" if close else "") + "\r\n").encode()
    statuses = collections.Counter()

    async def closing(n):
        for _ in range(n):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head)
            response = await reader.read()  # to the end: the server closes
            statuses[response.split(b" ", 2)[1].decode()] += 1
            writer.close()

    async def keep_alive(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(n):
            writer.write(head)
            response = await reader.readuntil(b"\r\n\r\n")
            statuses[response.split(b" ", 2)[1].decode()] += 1
            length = 0
            for line in response.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
        writer.close()

    each = closing if close else keep_alive
    await asyncio.gather(*(each(requests // conns) for _ in range(conns)))
    return statuses


def self_costs(path):
    """Per function: its own cost (no callees) of every event in one callgrind dump."""
    events, costs, names = [], collections.defaultdict(lambda: None), {}
    fn, after_call = None, False

    def name(text):
        m = re.match(r"\((\d+)\)(?: (.*))?", text)
        if not m:
            return text
        if m.group(2):
            names[m.group(1)] = m.group(2)
        return names.get(m.group(1), text)

    for line in Path(path).read_text(errors="replace").splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("fn="):
            fn = name(line[3:].strip())
        elif line.startswith("cfn="):
            name(line[4:].strip())
        elif line.startswith("calls="):
            after_call = True  # the next cost line is the call's inclusive cost
        elif line[:1].isdigit() or line[:1] in "+-*":
            if after_call:
                after_call = False
                continue
            values = [int(v) for v in line.split()[1:]]
            if fn and values:
                c = costs[fn] or [0] * len(events)
                for i, v in enumerate(values):
                    c[i] += v
                costs[fn] = c
    return events, dict(costs)


def measure(target, args, release, work, up_port, key, binary=None):
    """Runs `target` under callgrind; its per-function costs per request (busy threads summed)."""
    port = free_port()
    out = work / f"callgrind.{target}{'.binary' if binary else ''}"
    vg = ["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}.%p"]
    if args.cache_sim:
        vg.append("--cache-sim=yes")
    admin = None
    if target == "keygate":
        admin = free_port()
        config = work / "keygate.toml"
        config.write_text(keygate_config(port, admin, f"sqlite://{work / 'bench.db'}", up_port))
        cmd = [str(binary or release / "keygate"), "--config", str(config), "serve"]
    elif target == "passthrough":
        cmd = [str(release / "examples" / "bench_passthrough"), f"127.0.0.1:{port}", f"http://127.0.0.1:{up_port}"]
    elif target == "floor":
        cmd = [str(release / "examples" / "bench_floor"), f"127.0.0.1:{port}", f"127.0.0.1:{up_port}"]
    else:
        cmd = [str(release / "examples" / "bench_upstream"), f"127.0.0.1:{port}"]
    print(f"{target}: starting under callgrind ...", file=sys.stderr)
    proc = subprocess.Popen(vg + cmd, stdout=subprocess.DEVNULL, stderr=open(work / f"{target}.log", "wb"))
    try:
        wait_port(port, timeout=120)
        if admin:
            wait_port(admin, timeout=120)
            # Loaded and serving: the table load must not fall inside the measured requests.
            for _ in range(60):
                if proc.poll() is not None:
                    raise SystemExit(f"keygate exited under callgrind: see {work / (target + '.log')}")
                try:
                    wait_ready(admin)
                    break
                except SystemExit:
                    time.sleep(0.5)
            else:
                raise SystemExit("keygate under callgrind never became ready")
        asyncio.run(drive(port, args.conns, max(args.conns, args.requests // 10), key, args.close))
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        statuses = asyncio.run(drive(port, args.conns, args.requests, key, args.close))
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
    finally:
        proc.terminate()
        proc.wait()
    n = sum(statuses.values())
    print(f"{target}: {n} requests, statuses {dict(statuses)}", file=sys.stderr)
    dumps = sorted(work.glob(f"{out.name}.{proc.pid}.1-*"))
    per_thread = []
    for dump in dumps:
        events, costs = self_costs(dump)
        total = sum(c[0] for c in costs.values())
        per_thread.append((total, dump.name.rsplit("-", 1)[1], events, costs))
    grand = sum(t[0] for t in per_thread)
    # The threads that served the requests: those that ran hyper's HTTP/1 connections. The rest
    # keep time: the database, timers and flushes run on their intervals, and under callgrind a
    # run lasts some seconds where it would take a fraction of one, so their work per request
    # is inflated many times; they are listed by thread, not counted as serving.
    busy = [t for t in per_thread if any("hyper::proto::h1::dispatch" in fn for fn in t[3])]
    if not busy and binary:
        # A profile-guided build inlines the dispatcher into its callers, so its name is gone:
        # the serving threads are then the ones that did a tenth or more of all the work.
        busy = [t for t in per_thread if t[0] >= grand / 10]
    if not busy:
        raise SystemExit(f"no thread of {target} ran hyper's HTTP/1 dispatcher: nothing was served?")
    events = busy[0][2]
    merged = collections.defaultdict(lambda: [0] * len(events))
    for _, _, _, costs in busy:
        for fn, c in costs.items():
            for i, v in enumerate(c):
                merged[fn][i] += v
    print(f"\n{target}: {sum(t[0] for t in busy) / n:,.0f} instructions per request in the serving "
          f"threads ({grand / n:,.0f} in all); by thread: "
          + ", ".join(f"{tid} {t / n:,.0f}" for t, tid, _, _ in per_thread if t >= grand / 1000))
    return events, {fn: [v / n for v in c] for fn, c in merged.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", choices=TARGETS)
    ap.add_argument("--compare", choices=TARGETS, help="a second target: print the per-function difference")
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--bad-key", action="store_true", help="one character of the key changed, as the harness's 401 rows: its checksum fails and it is refused before any lookup")
    ap.add_argument("--close", action="store_true", help="a new connection for every request (`Connection: close`), as the harness's new-connection rows")
    ap.add_argument("--cache-sim", action="store_true")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--keys", type=int, default=10000)
    ap.add_argument("--binary", type=Path, help="the first target's keygate binary, such as benches/load/pgo.py's "
                    "target/pgo/release/keygate (default: the release build)")
    args = ap.parse_args()
    if args.binary and args.target != "keygate":
        raise SystemExit("--binary is a keygate binary: the target must be keygate")
    if not subprocess.run(["which", "valgrind"], capture_output=True).stdout:
        raise SystemExit("valgrind is required: apt-get install -y valgrind")

    print("building release binaries ...", file=sys.stderr)
    subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "keygate", "--example", "bench_upstream",
                    "--example", "bench_seed", "--example", "bench_floor"], cwd=ROOT, check=True)
    if "passthrough" in (args.target, args.compare):
        subprocess.run(["cargo", "build", "--release", "--quiet", "--features", "bench-passthrough",
                        "--example", "bench_passthrough"], cwd=ROOT, check=True)
    release = ROOT / "target" / "release"
    work = Path(tempfile.mkdtemp(prefix="keygate-callgrind-"))
    up_port = free_port()
    upstream = subprocess.Popen([str(release / "examples" / "bench_upstream"), f"127.0.0.1:{up_port}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(up_port)
        keys_file = work / "keys.txt"
        subprocess.run([str(release / "examples" / "bench_seed"), f"sqlite://{work / 'bench.db'}",
                        str(args.keys), str(keys_file)], check=True, capture_output=True)
        key = keys_file.read_text().split()[args.keys // 2]
        if args.bad_key:
            key = bad_key_of(key)
        # --binary is the first target's binary; `keygate --binary B --compare keygate` compares
        # build B with the release build.
        runs = [measure(args.target, args, release, work, up_port, key, args.binary)]
        if args.compare:
            runs.append(measure(args.compare, args, release, work, up_port, key))
    finally:
        upstream.terminate()
        upstream.wait()

    events, first = runs[0]
    print(f"\nown instructions per request, serving threads together ({', '.join(events)}):")
    if len(runs) == 1:
        rows = sorted(first.items(), key=lambda kv: -kv[1][0])[: args.top]
        total = [sum(c[i] for c in first.values()) for i in range(len(events))]
        print("  ".join(f"{v:8,.0f}" for v in total), "  total")
        for fn, c in rows:
            print("  ".join(f"{v:8,.0f}" for v in c), " ", fn[:120])
        return
    second = runs[1][1]
    label = f"{args.target} ({args.binary})" if args.binary else args.target
    totals = [sum(c[0] for c in r.values()) for r in (first, second)]
    print(f"{label} {totals[0]:,.0f} − {args.compare} {totals[1]:,.0f} = {totals[0] - totals[1]:+,.0f}")
    if len(events) > 1:
        for name, r in ((label, first), (args.compare, second)):
            print("  ".join(f"{sum(c[i] for c in r.values()):8,.0f}" for i in range(len(events))), " ", name)
    rows = []
    for fn in set(first) | set(second):
        a, b = first.get(fn, [0] * len(events))[0], second.get(fn, [0] * len(events))[0]
        rows.append((a - b, a, b, fn))
    rows.sort(key=lambda r: -abs(r[0]))
    print(f"{'diff':>8} {args.target:>12} {args.compare:>12}  function")
    for d, a, b, fn in rows[: args.top]:
        print(f"{d:+8,.0f} {a:12,.0f} {b:12,.0f}  {fn[:110]}")


if __name__ == "__main__":
    main()
