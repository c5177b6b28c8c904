#!/usr/bin/env python3
"""Regenerates hot-text.ld: the functions the node agent runs for every request,
placed together at the start of its code (see README.md in this directory).

Two sources, the agent's own first:

- `--agent-profile`: `perf record` profiles of the node agents under load
  (`weft-bench-l7 --profile DIR`). The functions of `weft-node` that hold 99.5% of
  its samples there, hottest first. Only these name the agent's own instances of
  generic code (tokio's task harness and scheduler, h2's connection, rustls'
  streams over TCP), which the benchmark below instantiates with other types.
- `weft-bench-l7-path --instructions --hot-code`, for each in-process request path:
  callgrind finds every function of the benchmark binary run on every request,
  including the small ones a sampling profile misses.

Each function becomes a pattern with its symbol's hash replaced by `*`, so it keeps
matching after a rebuild or a toolchain update. A generic function with more than 3
instances in `weft-node` (such as `Arc::drop_slow`) keeps its exact symbol instead,
so its cold instances stay out: from a profile, that is the agent's own instance;
from the benchmark, it matches only if the agent instantiates the function with the
same types.

Usage (root, from the repository root, after `make bench`):
    WEFT_WORKER_THREADS=1 target/release/weft-bench-l7 --rounds 1 --seconds 10 --pinned --profile /tmp/weft-profile
    python3 node-dataplane/link/gen-hot-text.py --agent-profile /tmp/weft-profile/*.perf.data

--bench defaults to target/release/weft-bench-l7-path, --agent to
target/release/weft-node (the binary the profiles sampled).
"""
import argparse
import bisect
import collections
import os
import re
import subprocess
import sys
import tempfile

MODES = ["l4", "l7", "l7-c", "hbone-l4", "hbone-l7", "mtls-l4", "mtls-l7"]
MAX_INSTANCES = 3
# The agent's functions holding this share of its samples in the profiles.
AGENT_SHARE = 0.995
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hot-text.ld")


def hot_code(binary, mode, out):
    """The code `binary --instructions` found run on every request of `mode`:
    instructions executed at each such address in its 3,000-request run."""
    subprocess.run([binary, "--instructions", "--mode", mode, "--hot-code", out],
                   check=True, stdout=subprocess.DEVNULL)
    counts = {}
    with open(out) as f:
        for line in f:
            _, addr, count = line.split()
            counts[int(addr, 16)] = int(count)
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


def agent_hot(agent, profiles):
    """The agent's functions holding AGENT_SHARE of its samples in `profiles`
    (perf.data files), hottest first."""
    samples = collections.Counter()
    name = os.path.basename(agent)
    for data in profiles:
        out = subprocess.run(["perf", "script", "-i", data, "-F", "ip,sym,dso",
                              "--no-demangle", "-G"],
                             capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            f = line.split()
            if len(f) == 3 and f[2].strip("()").endswith("/" + name) and f[1] != "[unknown]":
                samples[f[1]] += 1
    total, acc, hot = sum(samples.values()), 0, []
    for sym, n in samples.most_common():
        if acc >= AGENT_SHARE * total:
            break
        acc += n
        hot.append(sym)
    print(f"agent profiles: {total} samples in {name}, {len(hot)} functions hold "
          f"{acc / max(total, 1):.1%} of them", file=sys.stderr)
    return hot


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", default="target/release/weft-bench-l7-path")
    ap.add_argument("--agent", default="target/release/weft-node")
    ap.add_argument("--agent-profile", nargs="*", default=[],
                    help="perf.data files of the node agents under load")
    args = ap.parse_args()
    binary = os.path.realpath(args.bench)
    agent = os.path.realpath(args.agent)
    syms = symbols(binary)
    agent_counts = collections.Counter(
        wildcard(re.sub(r"\.llvm\.\d+$", "", s[2])) for s in symbols(agent))
    starts = [s[0] for s in syms]
    ordered, seen = [], set()
    for name in agent_hot(agent, args.agent_profile):
        p = pattern(name, agent_counts)
        if p not in seen:
            seen.add(p)
            ordered.append(p)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            hot = collections.Counter()
            for addr, c in hot_code(binary, mode, os.path.join(tmp, mode)).items():
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
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import importlib
    check = importlib.import_module("check-hot-text")
    matched = check.count_matching(ordered_plain(ordered), check.functions(agent))
    with open(OUT, "w") as f:
        f.write("/* Generated by gen-hot-text.py from profiles of the node agent under load\n"
                "   and the in-process request paths of weft-bench-l7-path; do not edit.\n"
                "   See README.md in this directory; check-hot-text.py reads the next line.\n"
                f"   matched-when-generated: {matched} */\n")
        f.write("SECTIONS\n{\n  .text.hot : {\n")
        for p in ordered:
            f.write(f"    *({p})\n")
        f.write("  }\n}\nINSERT BEFORE .text;\n")
    print(f"wrote {len(ordered)} patterns to {OUT}; {matched} match functions of {agent}",
          file=sys.stderr)


def ordered_plain(ordered):
    """The patterns without their `.text.` prefix, as check-hot-text.py reads them."""
    return [p[len(".text."):] for p in ordered]


if __name__ == "__main__":
    main()
