"""Helm release actions (install, upgrade, uninstall, status) against a real cluster,
with the Helm v4 SDK (PyPI helm-python-sdk, the same package the chart tests use).

Called by the Rust e2e harness (e2e/src/helm.rs) with the virtualenv's python:

    python helm_release.py --kubeconfig K --namespace N install  RELEASE --chart DIR [--values FILE] [--timeout S] [--wait MODE] [--server-side true|false]
    python helm_release.py --kubeconfig K --namespace N upgrade  RELEASE --chart DIR [--values FILE] [--timeout S] [--wait MODE] [--server-side true|false]
    python helm_release.py --kubeconfig K --namespace N uninstall RELEASE [--timeout S] [--wait MODE]
    python helm_release.py --kubeconfig K --namespace N status   RELEASE

Prints one JSON object on stdout: the release summary (name, namespace, revision,
status, chart_name, ...) with, instead of the manifest, the kinds and names of its
objects. On failure: the Helm error's class and message on stderr, exit status 1.

--server-side false is what Kubernetes 1.20-1.22 need: Helm 4 applies server-side
by default, and those API servers' server-side apply refuses weft's CRDs
(x-kubernetes-validations is a field they do not know; a plain create drops it).
"""

import argparse
import json
import sys

import helm_python as helm
import yaml
from helm_python import _native


def objects(manifest):
    out = []
    for doc in yaml.safe_load_all(manifest or ""):
        if doc:
            meta = doc.get("metadata", {})
            out.append({"kind": doc.get("kind"), "name": meta.get("name"), "namespace": meta.get("namespace")})
    return out


def summary(release):
    """A release summary, its manifest as a list of objects."""
    out = {k: v for k, v in release.items() if k not in ("manifest", "notes")}
    out["objects"] = objects(release.get("manifest"))
    return out


def release_action(func, cfg, chart, name, values, opts):
    """helm_install / helm_upgrade through the SDK's native layer: the same call
    Config.install/upgrade make, plus options their wrappers do not pass
    (server_side_apply)."""
    payload = _native.call_string(
        func, cfg._raw(), _native.HANDLE(0), _native.HANDLE(0), chart, name,
        None if values is None else json.dumps(values),
        json.dumps({k: v for k, v in opts.items() if v is not None}),
    )
    return json.loads(payload)


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
    p.add_argument("--server-side", choices=["true", "false"], default=None,
                   help="apply with server-side apply or not (default: Helm's; Helm 4 installs with it)")
    a = p.parse_args()
    values = None
    if a.values:
        with open(a.values) as f:
            values = json.load(f)
    if a.action in ("install", "upgrade") and not a.chart:
        p.error(f"{a.action} needs --chart")
    try:
        with helm.Config(kubeconfig_path=a.kubeconfig, namespace=a.namespace) as cfg:
            if a.action in ("install", "upgrade") and a.server_side is not None:
                opts = {"namespace": a.namespace, "timeout_seconds": a.timeout, "wait": a.wait}
                if a.action == "install":
                    # Helm's InstallOptions: a bool; UpgradeOptions: "true", "false" or "auto".
                    opts["server_side_apply"] = a.server_side == "true"
                    opts["create_namespace"] = True
                else:
                    opts["server_side_apply"] = a.server_side
                out = summary(release_action(f"helm_{a.action}", cfg, a.chart, a.release, values, opts))
            elif a.action == "install":
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
