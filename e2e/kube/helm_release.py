"""Helm release actions (install, upgrade, uninstall, status) against a real cluster,
with the Helm v4 SDK (PyPI helm-python-sdk, the same package the chart tests use).

Called by the Rust e2e harness (e2e/src/helm.rs) with the virtualenv's python:

    python helm_release.py --kubeconfig K --namespace N install  RELEASE --chart DIR [--values FILE] [--timeout S] [--wait MODE]
    python helm_release.py --kubeconfig K --namespace N upgrade  RELEASE --chart DIR [--values FILE] [--timeout S] [--wait MODE]
    python helm_release.py --kubeconfig K --namespace N uninstall RELEASE [--timeout S] [--wait MODE]
    python helm_release.py --kubeconfig K --namespace N status   RELEASE

Prints one JSON object on stdout: the release's name, namespace, revision, status,
chart and the kinds and names of the objects in its manifest. On failure: the Helm
error's class and message on stderr, exit status 1.
"""

import argparse
import json
import sys

import helm_python as helm
import yaml


def objects(manifest):
    out = []
    for doc in yaml.safe_load_all(manifest or ""):
        if doc:
            meta = doc.get("metadata", {})
            out.append({"kind": doc.get("kind"), "name": meta.get("name"), "namespace": meta.get("namespace")})
    return out


def summary(release):
    """The fields of a release summary the harness uses (the manifest as a list of objects)."""
    info = release.get("info") or {}
    chart = release.get("chart") or {}
    meta = chart.get("metadata") or {}
    return {
        "name": release.get("name"),
        "namespace": release.get("namespace"),
        "revision": release.get("version"),
        "status": info.get("status") or release.get("status"),
        "description": info.get("description"),
        "chart": f"{meta.get('name')}-{meta.get('version')}" if meta else None,
        "objects": objects(release.get("manifest")),
        "keys": sorted(release.keys()),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--namespace", required=True)
    p.add_argument("action", choices=["install", "upgrade", "uninstall", "status"])
    p.add_argument("release")
    p.add_argument("--chart")
    p.add_argument("--values", help="a JSON file of values")
    p.add_argument("--timeout", type=int, default=300, help="seconds")
    p.add_argument("--wait", default=None, help="watcher, legacy, hookOnly (default: no wait)")
    a = p.parse_args()
    values = None
    if a.values:
        with open(a.values) as f:
            values = json.load(f)
    if a.action in ("install", "upgrade") and not a.chart:
        p.error(f"{a.action} needs --chart")
    try:
        with helm.Config(kubeconfig_path=a.kubeconfig, namespace=a.namespace) as cfg:
            if a.action == "install":
                r = cfg.install(a.chart, a.release, values, namespace=a.namespace,
                                create_namespace=True, timeout=a.timeout, wait=a.wait)
                out = summary(r)
            elif a.action == "upgrade":
                r = cfg.upgrade(a.chart, a.release, values, namespace=a.namespace,
                                timeout=a.timeout, wait=a.wait)
                out = summary(r)
            elif a.action == "uninstall":
                r = cfg.uninstall(a.release, timeout=a.timeout, wait=a.wait)
                rel = r.get("release") or {}
                out = {"info": r.get("info"), **summary(rel)}
            else:
                out = summary(cfg.status(a.release))
    except helm.HelmError as e:
        print(f"helm {a.action} {a.release}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    json.dump(out, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
