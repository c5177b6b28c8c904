#!/usr/bin/env python3
"""Checks that hot-text.ld still describes the built agent: how many of its
patterns match a function of the binary, against how many matched the agent it
was generated from (recorded in the script), and that the binary has a .text.hot
section. Exits 1 when fewer than --min of that number match now: the request
path changed since the layout was made (run `make hot-text`, see README.md).

Not every pattern matches even when fresh: those from the in-process benchmark
name its instances of generic code, which the agent may instantiate otherwise.

Usage: check-hot-text.py [--agent target/release/weft-node] [--min 0.9]
"""
import argparse
import fnmatch
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def patterns(path):
    out = []
    with open(path) as f:
        for line in f:
            m = re.match(r"\s*\*\((\.text\.[^)]*)\)", line)
            if m:
                out.append(m.group(1)[len(".text."):])
    return out


def functions(binary):
    text = subprocess.run(["nm", "--defined-only", binary], check=True,
                          capture_output=True, text=True).stdout
    return {line.split()[-1] for line in text.splitlines()
            if len(line.split()) >= 3 and line.split()[1] in "tTwW"}


def count_matching(pats, syms):
    """How many of `pats` (glob patterns of symbol names) match a symbol of `syms`."""
    exact = [p for p in pats if "*" not in p]
    globs = [p for p in pats if "*" in p]
    matched = sum(1 for p in exact if p in syms)
    # A glob's leading literal part narrows the symbols to test.
    by_prefix = {}
    for s in syms:
        by_prefix.setdefault(s[:12], []).append(s)
    for p in globs:
        prefix = p.split("*", 1)[0]
        pool = by_prefix.get(prefix[:12], []) if len(prefix) >= 12 else syms
        if any(fnmatch.fnmatchcase(s, p) for s in pool):
            matched += 1
    return matched


def generated_matches(path):
    with open(path) as f:
        for line in f:
            m = re.search(r"matched-when-generated: (\d+)", line)
            if m:
                return int(m.group(1))
    return None


def hot_size(binary):
    text = subprocess.run(["readelf", "-SW", binary], check=True,
                          capture_output=True, text=True).stdout
    for line in text.splitlines():
        f = line.replace("[ ", "[").split()
        if len(f) > 6 and f[1] == ".text.hot":
            return int(f[5], 16)
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agent", default="target/release/weft-node")
    ap.add_argument("--script", default=os.path.join(HERE, "hot-text.ld"))
    ap.add_argument("--min", type=float, default=0.9)
    args = ap.parse_args()
    pats = patterns(args.script)
    matched = count_matching(pats, functions(args.agent))
    recorded = generated_matches(args.script)
    size = hot_size(args.agent)
    print(f"hot-text.ld: {matched} of {len(pats)} patterns match functions of {args.agent} "
          f"({recorded} when generated); .text.hot is {size / 1024:.0f} KiB")
    if size == 0:
        print("  .text.hot is missing: the binary was not linked with the layout "
              "(a debug build, or WEFT_HOT_TEXT=off)", file=sys.stderr)
        return 1
    if recorded is None:
        print("  the script records no match count: regenerate it (make hot-text)", file=sys.stderr)
        return 1
    if matched < args.min * recorded:
        print(f"  fewer than {args.min:.0%} of the {recorded} patterns that matched when it "
              "was generated match now: the layout is stale; run `make hot-text` "
              "(node-dataplane/link/README.md)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
