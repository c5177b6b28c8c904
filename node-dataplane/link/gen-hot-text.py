#!/usr/bin/env python3
"""Regenerates hot-text.ld: the functions the node agent runs for every request,
placed together at the start of its code (see README.md in this directory).

Runs `weft-bench-l7-path` under callgrind for each in-process request path, once
with 1,000 requests and once with 3,000. An instruction whose count grew by at
least 3/4 of a run per request is on the per-request path; the function holding it
(from `nm`) is hot. Each hot function becomes one input-section pattern with its
symbol hash replaced by `*`, so the script keeps matching after a rebuild, a new
toolchain, or for the same generic function instantiated with the agent's own
stream types instead of the benchmark's in-memory ones.

Usage (root, from the repository root, after `make bench`):
    python3 node-dataplane/link/gen-hot-text.py [BENCH_BINARY [AGENT_BINARY]]

BENCH_BINARY defaults to target/release/weft-bench-l7-path, AGENT_BINARY to
target/release/weft-node (read only to count a pattern's matches).
"""
import bisect
import collections
import os
import re
import subprocess
import sys
import tempfile

MODES = ["l4", "l7", "l7-c", "hbone-l4", "hbone-l7", "mtls-l4", "mtls-l7"]
RUNS = (1000, 3000)
MAX_INSTANCES = 3
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hot-text.ld")


def callgrind(binary, mode, requests, out):
    subprocess.run(
        ["valgrind", "--tool=callgrind", "--dump-instr=yes", "--compress-pos=no",
         "--compress-strings=no", f"--callgrind-out-file={out}", binary,
         "--mode", mode, "--rounds", "1", "--requests", str(requests)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def costs(path, binary):
    """Instructions executed per address of `binary` (calls' inclusive costs skipped)."""
    counts = collections.Counter()
    obj, after_call = None, False
    with open(path) as f:
        for line in f:
            if line.startswith("ob="):
                obj = line[3:].strip()
            elif line.startswith("calls="):
                after_call = True
            elif line.startswith("0x"):
                if after_call:
                    after_call = False
                elif obj == binary:
                    fields = line.split()
                    counts[int(fields[0], 16)] += int(fields[-1])
    return counts


def symbols(binary):
    out = subprocess.run(["nm", "-S", "--defined-only", binary],
                         capture_output=True, text=True, check=True).stdout
    syms = []
    for line in out.splitlines():
        f = line.split()
        if len(f) == 4 and f[2] in "tTwW":
            syms.append((int(f[0], 16), int(f[1], 16), f[3]))
    syms.sort()
    return syms


def wildcard(name):
    """The function's name with its hashes as wildcards."""
    name = re.sub(r"17h[0-9a-f]{16}E$", "17h*", name)  # legacy mangling
    return re.sub(r"Cs[0-9A-Za-z]+_", "Cs*_", name)  # v0: crate disambiguators


def pattern(name, agent_counts):
    """The input-section pattern for a hot function: its name with the hashes as
    wildcards, unless that matches more than MAX_INSTANCES of the agent's functions
    (a generic function instantiated for many types, such as `Arc::drop_slow`):
    then its exact name, which a rebuild with another toolchain no longer matches."""
    name = re.sub(r"\.llvm\.\d+$", "", name)
    w = wildcard(name)
    if agent_counts.get(w, 0) > MAX_INSTANCES:
        return ".text." + name + "*"
    return ".text." + w


def main():
    binary = os.path.realpath(sys.argv[1] if len(sys.argv) > 1 else "target/release/weft-bench-l7-path")
    agent = os.path.realpath(sys.argv[2] if len(sys.argv) > 2 else "target/release/weft-node")
    syms = symbols(binary)
    agent_counts = collections.Counter(
        wildcard(re.sub(r"\.llvm\.\d+$", "", s[2])) for s in symbols(agent))
    starts = [s[0] for s in syms]
    ordered, seen = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            (few, many) = RUNS
            runs = {}
            for n in RUNS:
                out = os.path.join(tmp, f"{mode}.{n}")
                callgrind(binary, mode, n, out)
                runs[n] = costs(out, binary)
            hot = collections.Counter()
            for addr, c in runs[many].items():
                if c - runs[few].get(addr, 0) >= (many - few) * 3 // 4:
                    i = bisect.bisect_right(starts, addr) - 1
                    if i >= 0 and addr < syms[i][0] + syms[i][1]:
                        hot[syms[i][2]] += c
            added = 0
            for name, _ in hot.most_common():
                p = pattern(name, agent_counts)
                if p.startswith(".text._ZN18weft_bench_l7_path") or p in seen:
                    continue
                seen.add(p)
                ordered.append(p)
                added += 1
            print(f"{mode}: {len(hot)} functions per request, {added} new patterns", file=sys.stderr)
    with open(OUT, "w") as f:
        f.write("/* Generated by gen-hot-text.py from the in-process request paths of\n"
                "   weft-bench-l7-path; do not edit. See README.md in this directory. */\n")
        f.write("SECTIONS\n{\n  .text.hot : {\n")
        for p in ordered:
            f.write(f"    *({p})\n")
        f.write("  }\n}\nINSERT BEFORE .text;\n")
    print(f"wrote {len(ordered)} patterns to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
