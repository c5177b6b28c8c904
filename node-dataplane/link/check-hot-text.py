#!/usr/bin/env python3
"""Checks that hot-text.ld still describes the built agent: the share of its
patterns that match at least one function of the binary, and the size of the
.text.hot section they placed. Exits 1 when fewer than --min of the patterns
match (the layout went stale: regenerate it, see README.md).

Usage: check-hot-text.py [--agent target/release/weft-node] [--min 0.8]
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
    ap.add_argument("--min", type=float, default=0.8)
    args = ap.parse_args()
    pats = patterns(args.script)
    syms = functions(args.agent)
    exact = {p for p in pats if "*" not in p}
    globs = [p for p in pats if "*" in p]
    # A glob with its leading literal part narrows the symbols to test.
    matched = sum(1 for p in exact if p in syms)
    by_prefix = {}
    for s in syms:
        by_prefix.setdefault(s[:12], []).append(s)
    for p in globs:
        prefix = p.split("*", 1)[0]
        pool = by_prefix.get(prefix[:12], []) if len(prefix) >= 12 else syms
        if any(fnmatch.fnmatchcase(s, p) for s in pool):
            matched += 1
    share = matched / max(len(pats), 1)
    size = hot_size(args.agent)
    print(f"hot-text.ld: {matched} of {len(pats)} patterns ({share:.1%}) match functions "
          f"of {args.agent}; .text.hot is {size / 1024:.0f} KiB")
    if size == 0:
        print("  .text.hot is missing: the binary was not linked with the layout "
              "(a debug build, or WEFT_HOT_TEXT=off)", file=sys.stderr)
        return 1
    if share < args.min:
        print(f"  fewer than {args.min:.0%} of the patterns match: the layout is stale; "
              "regenerate it (node-dataplane/link/README.md)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
