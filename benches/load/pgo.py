#!/usr/bin/env python3
"""A profile-guided (PGO) release build of keygate: `target/pgo/release/keygate`.

keygate's own code runs at a low rate of instructions per second: a forwarded request misses
the first-level instruction cache about eight times as often as a bare hyper proxy's does
(benches/RESULTS.md). Laying out and inlining the code by a profile of real traffic addresses
that. This script:

 1. builds keygate instrumented (`-Cprofile-generate`) into target/pgo-gen;
 2. trains it on loopback with the load harness's parts: the harness's upstream, 10,000 seeded
    keys in SQLite, and wrk (keep-alive HTTP/1.1 at 16 and 128 connections, refusals, a new
    connection per request, HTTP/1.1 over TLS) and h2load (h2c) when installed;
 3. merges the profile with the `llvm-profdata` of rustc's own LLVM version;
 4. builds keygate again with the profile (`-Cprofile-use`) into target/pgo.

The result is the same code and behaviour as `cargo build --release`, laid out for speed; the
two differ only in CPU per request and what follows from it (benches/RESULTS.md has both side
by side). Takes two release builds (about eight minutes on 2 cores) and half a minute of
training. Needs wrk, openssl and an `llvm-profdata` of the LLVM version `rustc -vV` names
(Debian: `apt-get install -y wrk llvm-22`; or rustup's `llvm-tools` component).

    python3 benches/load/pgo.py            # then: target/pgo/release/keygate --config ... serve
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (HERE, ROOT, Target, bad_key_of, free_port, keygate_config, run_h2load, run_wrk,  # noqa: E402
                     self_signed_cert, wait_port, wait_ready)

TRAINING_SECONDS = 4


def llvm_profdata():
    """The `llvm-profdata` that reads what rustc's LLVM writes: the same major version."""
    version = subprocess.run(["rustc", "-vV"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"LLVM version: (\d+)", version)
    if not found:
        raise SystemExit("cannot tell rustc's LLVM version from `rustc -vV`")
    major = found.group(1)
    sysroot = subprocess.run(["rustc", "--print", "sysroot"], capture_output=True, text=True, check=True).stdout.strip()
    host = re.search(r"host: (\S+)", version).group(1)
    candidates = [shutil.which(f"llvm-profdata-{major}"), shutil.which("llvm-profdata"),
                  str(Path(sysroot) / "lib" / "rustlib" / host / "bin" / "llvm-profdata")]
    for tool in filter(None, candidates):
        if not Path(tool).exists():
            continue
        out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout
        if re.search(rf"LLVM version {major}\.", out):
            return tool
    raise SystemExit(f"no llvm-profdata for LLVM {major} (rustc's): apt-get install -y llvm-{major}, "
                     "or rustup component add llvm-tools")


def cargo_build(target_dir, rustflag, *what):
    # The encoded form takes the flag whole, whatever the path in it holds (spaces included).
    env = dict(os.environ, CARGO_TARGET_DIR=str(target_dir), CARGO_ENCODED_RUSTFLAGS=rustflag)
    env.pop("RUSTFLAGS", None)
    subprocess.run(["cargo", "build", "--release", "--locked", "--quiet", *what], cwd=ROOT, env=env, check=True)


def train(binary, profiles, release):
    """Runs the instrumented `binary` under the harness's kinds of traffic; it writes its profile
    into `profiles` when it exits."""
    work = Path(tempfile.mkdtemp(prefix="keygate-pgo-"))
    procs = []

    def spawn(cmd, name, env=None):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(work / f"{name}.log", "ab"), env=env)
        procs.append(p)
        return p

    try:
        up_port = free_port()
        spawn([str(release / "examples" / "bench_upstream"), f"127.0.0.1:{up_port}"], "upstream")
        wait_port(up_port)
        db = f"sqlite://{work / 'bench.db'}"
        keys_file = work / "keys.txt"
        subprocess.run([str(release / "examples" / "bench_seed"), db, "10000", str(keys_file)],
                       check=True, capture_output=True)
        keys = keys_file.read_text().split()
        key = keys[len(keys) // 2]
        bad_key = bad_key_of(key)
        cert, cert_key = work / "cert.pem", work / "key.pem"
        self_signed_cert(cert, cert_key)
        env = dict(os.environ, LLVM_PROFILE_FILE=str(profiles / "keygate-%p-%m.profraw"))
        lua = HERE / "report.lua"
        for tls in (False, True):
            port, admin = free_port(), free_port()
            config = work / f"keygate-{tls}.toml"
            config.write_text(keygate_config(port, admin, db, up_port, (cert, cert_key) if tls else None))
            keygate = spawn([str(binary), "--config", str(config), "serve"], f"keygate-{tls}", env)
            wait_ready(admin)
            good, bad, close = [f"X-Api-Key: {key}"], [f"X-Api-Key: {bad_key}"], "Connection: close"
            if tls:
                runs = [("forwarded", good, 16)]
            else:
                runs = [("forwarded", good, 16), ("forwarded", good, 128), ("refused (401)", bad, 16),
                        ("a new connection each", good + [close], 16)]
            scheme = "https" if tls else "http"
            for what, headers, conns in runs:
                print(f"training: {scheme}, {conns} connections, {what}", file=sys.stderr)
                r = run_wrk(Target("keygate", port, lambda: [], headers, scheme), conns, TRAINING_SECONDS, lua)
                # A profile of the wrong path would be worse than none: every answer as meant.
                meant_refusals = r["requests"] if headers is bad else 0
                if r["errors"] or not r["requests"] or r["non2xx"] != meant_refusals:
                    raise SystemExit(f"training traffic ({scheme}, {what}) was not answered as meant: {r}")
            if not tls and shutil.which("h2load"):
                print("training: h2c, 16 connections × 10 streams, forwarded", file=sys.stderr)
                r = run_h2load(Target("keygate", port, lambda: [], good), 16, 10, duration=TRAINING_SECONDS)
                if r["errors"] or r["non2xx"]:
                    raise SystemExit(f"h2c training traffic was not answered as meant: {r}")
            keygate.send_signal(signal.SIGTERM)
            if keygate.wait(timeout=60) != 0:
                raise SystemExit(f"the instrumented keygate did not exit cleanly: see {work}")
            procs.remove(keygate)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    shutil.rmtree(work, ignore_errors=True)


def build():
    """Builds target/pgo/release/keygate; returns its path."""
    for tool in ("wrk", "openssl"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is required: apt-get install -y wrk openssl")
    profdata_tool = llvm_profdata()
    gen_dir, use_dir = ROOT / "target" / "pgo-gen", ROOT / "target" / "pgo"
    profiles = gen_dir / "profiles"
    shutil.rmtree(profiles, ignore_errors=True)
    profiles.mkdir(parents=True)
    print("building keygate instrumented (target/pgo-gen) ...", file=sys.stderr)
    # Build scripts and proc macros are instrumented too; they write beside, not into, `profiles`.
    cargo_build(gen_dir, f"-Cprofile-generate={gen_dir / 'build-profiles'}", "--bin", "keygate")
    print("building the harness's upstream and seeder ...", file=sys.stderr)
    subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "bench_upstream", "--example",
                    "bench_seed"], cwd=ROOT, check=True)
    release = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release"
    train(gen_dir / "release" / "keygate", profiles, release)
    raw = sorted(profiles.glob("*.profraw"))
    if not raw:
        raise SystemExit("the instrumented keygate wrote no profile")
    merged = gen_dir / "keygate.profdata"
    subprocess.run([profdata_tool, "merge", "-o", str(merged), *map(str, raw)], check=True)
    print("building keygate with the profile (target/pgo) ...", file=sys.stderr)
    cargo_build(use_dir, f"-Cprofile-use={merged}", "--bin", "keygate")
    binary = use_dir / "release" / "keygate"
    print(f"built {binary.relative_to(ROOT)}", file=sys.stderr)
    return binary


if __name__ == "__main__":
    build()
