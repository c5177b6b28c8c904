"""Tests of the weft Helm chart with the real Helm SDK (helm-python-sdk, Helm v4)
and the Kubernetes OpenAPI schemas (kubernetes-validate).

Run by `cargo test` (e2e/tests/helm_chart.rs), which prepares a virtualenv; by hand:
    python -m unittest discover -s charts/weft/tests -v
"""

import json
import os
import pathlib
import subprocess
import unittest

import helm_python as helm
import kubernetes_validate
import yaml

CHART = pathlib.Path(__file__).resolve().parent.parent
REPO = CHART.parent.parent
KUBE_VERSION = "1.30.0"
# Kinds whose schemas are not Kubernetes' own (Prometheus Operator CRDs).
NOT_IN_KUBERNETES = {"ServiceMonitor", "PodMonitor"}

VARIATIONS = {
    "defaults": {},
    "monitoring-and-privileged": {
        "controlPlane": {"replicas": 3, "podDisruptionBudget": {"enabled": False}},
        "node": {"privileged": True, "loadBalancing": "round-robin"},
        "serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
        "podMonitor": {"enabled": True, "interval": "30s"},
        "dashboards": {"enabled": False},
    },
    "custom-images-and-placement": {
        "trustDomain": "prod.example.org",
        "logFormat": "text",
        "controlPlane": {
            "image": {"repository": "registry.example.org/weft/cp", "tag": "1.2.3"},
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}],
            "svidTtl": "12h",
            "defaultIdentityFallback": True,
        },
        "node": {
            "image": {"repository": "registry.example.org/weft/node", "tag": "1.2.3", "pullPolicy": "Always"},
            "cniConfDir": "/etc/cni/multus/net.d",
            # Nodes sharing one kernel (weft's test cluster): each its own cgroup.
            "cgroupRoot": "/sys/fs/cgroup/unified",
            "captureCgroup": "/sys/fs/cgroup/unified/weft-kube/$(WEFT_NODE_NAME)",
        },
        "dashboards": {"namespace": "monitoring"},
    },
}


# The binary each workload's image runs when a container sets no `command`.
ENTRYPOINT = {"DaemonSet": "weft-node", "Deployment": "weft-control-plane"}


def render(values):
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="weft", namespace="weft-system", is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return docs


def leaf_paths(d, prefix=""):
    for k, v in d.items():
        p = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            yield from leaf_paths(v, p)
        else:
            yield p


class ChartTests(unittest.TestCase):
    def test_binaries_accept_every_container_command_line(self):
        """Every container's command line, as rendered, is accepted by the binary it
        runs: with `--help` appended, the binary exits 0 only after parsing every
        argument before it. (The chart once passed `--bin-dir=...` to an installer
        that only took `--bin-dir ...`.)"""
        bin_dir = os.environ.get("WEFT_BIN_DIR")
        self.assertTrue(bin_dir, "set WEFT_BIN_DIR to the built binaries (e2e/tests/helm_chart.rs does)")
        checked = 0
        for name, values in VARIATIONS.items():
            for _, d in render(values):
                if d["kind"] not in ENTRYPOINT:
                    continue
                spec = d["spec"]["template"]["spec"]
                for c in spec.get("initContainers", []) + spec["containers"]:
                    argv = (c.get("command") or [ENTRYPOINT[d["kind"]]]) + c.get("args", [])
                    r = subprocess.run(
                        [os.path.join(bin_dir, argv[0])] + argv[1:] + ["--help"],
                        capture_output=True, text=True, stdin=subprocess.DEVNULL,
                    )
                    self.assertEqual(
                        r.returncode, 0,
                        f"{name}: {d['kind']} container {c['name']}: {' '.join(argv)}\n{r.stderr}",
                    )
                    checked += 1
        # Per variation: the node's installer and agent, the control plane.
        self.assertEqual(checked, 3 * len(VARIATIONS))

    def test_lint_is_clean(self):
        for name, values in VARIATIONS.items():
            r = helm.lint(str(CHART), values, strict=True, namespace="weft-system")
            self.assertEqual(r["errors"], [], f"{name}: {r['messages']}")
            self.assertEqual(r["messages"], [], f"{name}: {r['messages']}")

    def test_every_manifest_validates_against_kubernetes_schemas(self):
        for name, values in VARIATIONS.items():
            docs = render(values)
            self.assertGreater(len(docs), 8, name)
            for path, doc in docs:
                if doc["kind"] in NOT_IN_KUBERNETES:
                    self.assertEqual(doc["apiVersion"], "monitoring.coreos.com/v1")
                    continue
                try:
                    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
                except kubernetes_validate.ValidationError as e:
                    self.fail(f"{name}: {path} {doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}")

    def test_expected_objects_per_variation(self):
        kinds = lambda docs: sorted({d["kind"] for _, d in docs})
        default = render({})
        self.assertEqual(
            kinds(default),
            ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Deployment",
             "PodDisruptionBudget", "Role", "RoleBinding", "Service", "ServiceAccount"],
        )
        mon = render(VARIATIONS["monitoring-and-privileged"])
        self.assertIn("ServiceMonitor", kinds(mon))
        self.assertIn("PodMonitor", kinds(mon))
        self.assertNotIn("PodDisruptionBudget", kinds(mon))
        self.assertNotIn("ConfigMap", kinds(mon))
        ds = next(d for _, d in mon if d["kind"] == "DaemonSet")
        self.assertTrue(ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"])
        self.assertIn("--lb=round-robin", ds["spec"]["template"]["spec"]["containers"][0]["args"])

    def test_images_and_settings_are_values(self):
        docs = render(VARIATIONS["custom-images-and-placement"])
        dep = next(d for _, d in docs if d["kind"] == "Deployment")
        ds = next(d for _, d in docs if d["kind"] == "DaemonSet")
        cp = dep["spec"]["template"]["spec"]
        self.assertEqual(cp["containers"][0]["image"], "registry.example.org/weft/cp:1.2.3")
        self.assertIn("--trust-domain=prod.example.org", cp["containers"][0]["args"])
        self.assertIn("--svid-ttl=12h", cp["containers"][0]["args"])
        self.assertIn("--default-identity-fallback", cp["containers"][0]["args"])
        self.assertEqual(cp["nodeSelector"], {"kubernetes.io/os": "linux"})
        node = ds["spec"]["template"]["spec"]
        self.assertEqual(node["containers"][0]["image"], "registry.example.org/weft/node:1.2.3")
        self.assertEqual(node["initContainers"][0]["image"], "registry.example.org/weft/node:1.2.3")
        self.assertEqual(node["containers"][0]["imagePullPolicy"], "Always")
        cni = next(v for v in node["volumes"] if v["name"] == "cni-conf")
        self.assertEqual(cni["hostPath"]["path"], "/etc/cni/multus/net.d")
        for _, d in docs:
            if d["kind"] == "ConfigMap":
                self.assertEqual(d["metadata"]["namespace"], "monitoring")
        # Defaults: the chart's appVersion as tag.
        dep = next(d for _, d in render({}) if d["kind"] == "Deployment")
        self.assertTrue(dep["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.1.0"))
        # Pods without a ServiceAccount get no identity unless asked.
        self.assertNotIn("--default-identity-fallback", dep["spec"]["template"]["spec"]["containers"][0]["args"])

    def test_capture_cgroup(self):
        """By default the agent finds the cgroup2 root itself (on hybrid hosts it is not
        node.cgroupRoot but /sys/fs/cgroup/unified below it); node.captureCgroup names
        another, with $(WEFT_NODE_NAME) expanded by Kubernetes from the container's env."""
        def agent(values):
            ds = next(d for _, d in render(values) if d["kind"] == "DaemonSet")
            return ds["spec"]["template"]["spec"]["containers"][0]
        c = agent({})
        self.assertFalse([a for a in c["args"] if a.startswith("--cgroup")], c["args"])
        c = agent(VARIATIONS["custom-images-and-placement"])
        self.assertIn("--cgroup=/sys/fs/cgroup/unified/weft-kube/$(WEFT_NODE_NAME)", c["args"])
        self.assertIn("WEFT_NODE_NAME", [e["name"] for e in c["env"]])
        cgroup = next(m for m in c["volumeMounts"] if m["name"] == "cgroup")
        self.assertEqual(cgroup["mountPath"], "/sys/fs/cgroup/unified")
        self.assertTrue(cgroup["readOnly"])
        with helm.Chart.load(str(CHART)) as chart:
            with self.assertRaises(helm.HelmValuesError) as cm:
                chart.validate_schema({"node": {"captureCgroup": "relative/path"}})
            self.assertIn("/node/captureCgroup", str(cm.exception))

    def test_pod_disruption_budget_follows_the_cluster(self):
        """policy/v1 where the cluster serves it (offline rendering assumes a current
        cluster), policy/v1beta1 on 1.20: the template asks the API versions (the
        real install on 1.20 is e2e/tests/kube_install.rs)."""
        pdb = next(d for _, d in render({}) if d["kind"] == "PodDisruptionBudget")
        self.assertEqual(pdb["apiVersion"], "policy/v1")
        template = (CHART / "templates" / "control-plane.yaml").read_text()
        self.assertIn('.Capabilities.APIVersions.Has "policy/v1"', template)

    def test_control_plane_is_hardened(self):
        docs = render({})
        dep = next(d for _, d in docs if d["kind"] == "Deployment")
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        self.assertTrue(pod["securityContext"]["runAsNonRoot"])
        self.assertTrue(c["securityContext"]["readOnlyRootFilesystem"])
        self.assertFalse(c["securityContext"]["allowPrivilegeEscalation"])
        self.assertEqual(c["securityContext"]["capabilities"]["drop"], ["ALL"])
        self.assertIn("readinessProbe", c)
        self.assertIn("livenessProbe", c)
        self.assertEqual(dep["spec"]["replicas"], 2)
        ds = next(d for _, d in docs if d["kind"] == "DaemonSet")
        node = ds["spec"]["template"]["spec"]
        self.assertTrue(node["hostNetwork"])
        self.assertFalse(node["containers"][0]["securityContext"]["privileged"])
        self.assertEqual(
            sorted(node["containers"][0]["securityContext"]["capabilities"]["add"]),
            ["BPF", "NET_ADMIN", "NET_RAW", "PERFMON", "SYS_ADMIN", "SYS_PTRACE"],
        )
        mounts = {m["name"] for m in node["containers"][0]["volumeMounts"]}
        self.assertEqual(mounts, {"credentials", "run", "bpffs", "cgroup", "netns", "cni-bin", "cni-conf"})
        token = node["volumes"][0]["projected"]["sources"][0]["serviceAccountToken"]
        self.assertEqual(token["audience"], "weft.dev/control-plane")
        self.assertEqual(node["initContainers"][0]["command"], ["weft-cni", "install"])

    def test_an_agent_change_makes_a_new_daemonset_that_can_run_beside_the_old(self):
        """The DaemonSet is named after its pod spec: an upgrade that changes the
        agent makes a new one (Helm deletes the old, whose agents drain), and nothing
        keeps the two from running on a node at once (no host ports)."""
        def node_ds(values):
            return next(d for _, d in render(values) if d["kind"] == "DaemonSet")
        a, again = node_ds({}), node_ds({})
        b = node_ds({"node": {"loadBalancing": "round-robin"}})
        self.assertEqual(a["metadata"]["name"], again["metadata"]["name"], "stable for the same values")
        self.assertNotEqual(a["metadata"]["name"], b["metadata"]["name"])
        self.assertTrue(a["metadata"]["name"].startswith("weft-node-"))
        for ds in (a, b):
            rev = ds["metadata"]["labels"]["weft.dev/node-revision"]
            self.assertEqual(ds["spec"]["selector"]["matchLabels"]["weft.dev/node-revision"], rev)
            self.assertEqual(ds["spec"]["template"]["metadata"]["labels"]["weft.dev/node-revision"], rev)
            pod = ds["spec"]["template"]["spec"]
            for c in pod["containers"] + pod["initContainers"]:
                self.assertNotIn("ports", c, "host ports would keep the successor off the node")
            self.assertEqual(pod["terminationGracePeriodSeconds"], 30 + 60 + 15)
            args = pod["containers"][0]["args"]
            self.assertIn("--successor-wait=30s", args)
            self.assertIn("--drain-timeout=60s", args)
            self.assertIn("--release-daemonsets=app.kubernetes.io/instance=weft,app.kubernetes.io/component=node", args)

    def test_node_agents_may_only_read_daemonsets_in_their_namespace(self):
        docs = render({})
        roles = [d for _, d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "weft-node"]
        self.assertEqual(len(roles), 1)
        self.assertEqual(roles[0]["metadata"]["namespace"], "weft-system")
        self.assertEqual(
            roles[0]["rules"],
            [{"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get", "list", "watch"]}],
        )
        cluster_subjects = [
            s for _, d in docs if d["kind"] == "ClusterRoleBinding" for s in d["subjects"]
        ]
        self.assertNotIn("weft-node", [s["name"] for s in cluster_subjects])

    def test_rbac_has_no_wildcards(self):
        for name, values in VARIATIONS.items():
            for _, d in render(values):
                if d["kind"] not in ("ClusterRole", "Role"):
                    continue
                for rule in d["rules"]:
                    for field in ("verbs", "resources", "apiGroups", "resourceNames"):
                        self.assertNotIn("*", rule.get(field, []), f"{name}: {d['kind']} {d['metadata']['name']}: {rule}")
                    self.assertNotIn("escalate", rule["verbs"])
                    self.assertNotIn("impersonate", rule["verbs"])
                    if "secrets" in rule["resources"]:
                        self.assertEqual(d["kind"], "Role", "secrets only in the release namespace")

    def test_crds_are_identical_to_the_repository(self):
        chart_crds = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
        repo_crds = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
        self.assertEqual(chart_crds, repo_crds)
        for n in repo_crds:
            self.assertEqual(
                (CHART / "crds" / n).read_bytes(), (REPO / "crds" / n).read_bytes(),
                f"charts/weft/crds/{n} differs from crds/{n}: copy it (make crds does)",
            )

    def test_dashboards_are_configmaps_for_the_grafana_sidecar(self):
        files = sorted((CHART / "dashboards").glob("*.json"))
        cms = [d for _, d in render({}) if d["kind"] == "ConfigMap"]
        self.assertEqual(len(cms), len(files))
        for f, cm in zip(files, sorted(cms, key=lambda c: c["metadata"]["name"])):
            self.assertEqual(cm["metadata"]["labels"]["grafana_dashboard"], "1")
            self.assertEqual(json.loads(cm["data"][f.name]), json.loads(f.read_text()))

    def test_schema_rejects_bad_values_readably(self):
        cases = [
            ({"node": {"loadBalancing": "random"}}, "/node/loadBalancing", "must be one of"),
            ({"controlPlane": {"replicas": 0}}, "/controlPlane/replicas", "minimum"),
            ({"controlPlane": {"replica": 2}}, "/controlPlane", "replica"),
            ({"trustDomain": "Bad Domain"}, "/trustDomain", "pattern"),
            ({"controlPlane": {"svidTtl": "one day"}}, "/controlPlane/svidTtl", "pattern"),
        ]
        with helm.Chart.load(str(CHART)) as chart:
            chart.validate_schema({})
            for values, where, what in cases:
                with self.assertRaises(helm.HelmValuesError, msg=str(values)) as cm:
                    chart.validate_schema(values)
                msg = str(cm.exception)
                self.assertIn(where, msg, msg)
                self.assertIn(what, msg, msg)

    def test_dashboards_are_generated_and_valid(self):
        import importlib.util
        spec = importlib.util.spec_from_file_location("gen", CHART / "dashboards" / "generate.py")
        gen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(gen)
        rendered = gen.render()
        committed = {p.name: p.read_text() for p in (CHART / "dashboards").glob("*.json")}
        self.assertEqual(sorted(committed), sorted(rendered))
        for name, text in rendered.items():
            self.assertEqual(committed[name], text, f"{name} is stale: run python3 charts/weft/dashboards/generate.py")
            d = json.loads(text)
            self.assertGreaterEqual(d["schemaVersion"], 36)
            ids = [p["id"] for p in d["panels"]]
            self.assertEqual(len(ids), len(set(ids)), f"{name}: panel ids not unique")
            self.assertEqual(d["templating"]["list"][0]["type"], "datasource")
            for p in d["panels"]:
                self.assertTrue(p["targets"], f"{name}: panel {p['title']} has no query")
                self.assertEqual(p["datasource"]["uid"], "${datasource}")

    def test_readme_documents_every_value(self):
        values = yaml.safe_load((CHART / "values.yaml").read_text())
        readme = (CHART / "README.md").read_text()
        missing = [p for p in leaf_paths(values) if f"`{p}`" not in readme]
        self.assertEqual(missing, [], "values not documented in charts/weft/README.md")


if __name__ == "__main__":
    unittest.main()
