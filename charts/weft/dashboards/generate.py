"""Generates weft's Grafana dashboards (charts/weft/dashboards/*.json).

    python3 charts/weft/dashboards/generate.py

A test (charts/weft/tests) fails when the committed JSON differs from this output.
Every panel query must return data on a live mesh: the Prometheus end-to-end test
evaluates each one.
"""

import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent
SCHEMA_VERSION = 39


def datasource():
    return {"type": "prometheus", "uid": "${datasource}"}


def variables(*names):
    out = [{
        "name": "datasource", "label": "Data source", "type": "datasource",
        "query": "prometheus", "current": {}, "hide": 0, "refresh": 1,
    }]
    queries = {
        "namespace": "label_values(weft_node_enrolled_pods, namespace)",
        "workload": "label_values(weft_node_enrolled_pods{namespace=~\"$namespace\"}, workload)",
        # The `node` label comes from the scrape config (the chart's PodMonitor sets
        # it from the pod's node name); see docs/metrics.md.
        "node": "label_values(weft_node_control_plane_connected, node)",
    }
    for n in names:
        out.append({
            "name": n, "label": n.capitalize(), "type": "query", "datasource": datasource(),
            "query": {"query": queries[n], "refId": f"{n}-var"}, "definition": queries[n],
            "includeAll": True, "multi": True, "allValue": ".*", "current": {},
            "refresh": 2, "sort": 1, "hide": 0,
        })
    return {"list": out}


class Board:
    def __init__(self, uid, title, description, variables):
        self.uid, self.title, self.description = uid, title, description
        self.variables = variables
        self.panels = []
        self.y = 0
        self.x = 0

    def panel(self, title, targets, kind="timeseries", unit="short", w=12, h=8, description=""):
        if self.x + w > 24:
            self.x = 0
            self.y += h
        p = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": datasource(),
            "gridPos": {"x": self.x, "y": self.y, "w": w, "h": h},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {},
            "targets": [
                {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "datasource": datasource()}
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        if kind == "stat":
            p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}}
        self.panels.append(p)
        self.x += w
        return self

    def row(self):
        self.x = 0
        self.y += 8
        return self

    def json(self):
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["weft"],
            "editable": True,
            "schemaVersion": SCHEMA_VERSION,
            "version": 1,
            "time": {"from": "now-1h", "to": "now"},
            "refresh": "30s",
            "timezone": "",
            "graphTooltip": 1,
            "templating": variables(*self.variables),
            "annotations": {"list": []},
            "links": [],
            "panels": self.panels,
        }


NS = 'destination_namespace=~"$namespace"'


def overview():
    b = Board("weft-mesh-overview", "weft / Mesh overview",
              "Traffic volume, success rate, denials and mTLS share across the mesh.", ["namespace"])
    b.panel("Connections opened / s",
            [(f"sum(rate(weft_tcp_connections_opened_total{{{NS}}}[5m]))", "connections/s")],
            kind="stat", unit="cps", w=6, h=4)
    b.panel("Requests / s (L7)",
            [(f"sum(rate(weft_requests_total{{{NS}}}[5m]))", "requests/s")], kind="stat", unit="reqps", w=6, h=4)
    b.panel("Request success rate (non-5xx)",
            [(f"sum(rate(weft_requests_total{{{NS},response_code!~\"5..\"}}[5m])) / sum(rate(weft_requests_total{{{NS}}}[5m]))", "success")],
            kind="stat", unit="percentunit", w=6, h=4)
    b.panel("mTLS share of connections",
            [(f"sum(rate(weft_tcp_connections_opened_total{{{NS},connection_security_policy=\"mutual_tls\"}}[5m])) / sum(rate(weft_tcp_connections_opened_total{{{NS}}}[5m]))", "mTLS")],
            kind="stat", unit="percentunit", w=6, h=4)
    b.row()
    b.panel("Connections by destination workload",
            [(f"sum by (destination_namespace, destination_workload) (rate(weft_tcp_connections_opened_total{{{NS}}}[5m]))",
              "{{destination_namespace}}/{{destination_workload}}")], unit="cps")
    b.panel("Bytes by destination workload",
            [(f"sum by (destination_namespace, destination_workload) (rate(weft_tcp_sent_bytes_total{{{NS}}}[5m]) + rate(weft_tcp_received_bytes_total{{{NS}}}[5m]))",
              "{{destination_namespace}}/{{destination_workload}}")], unit="Bps")
    b.panel("Authorization decisions by policy",
            [("sum by (decision, policy) (rate(weft_authz_decisions_total[5m]))", "{{decision}} {{policy}}")], unit="ops")
    b.panel("Requests by response code",
            [(f"sum by (response_code) (rate(weft_requests_total{{{NS}}}[5m]))", "{{response_code}}")], unit="reqps")
    return b


# Selectors reused by the boards.
WL_IN = 'reporter="destination",destination_namespace=~"$namespace",destination_workload=~"$workload"'
WL_OUT = 'reporter="source",source_namespace=~"$namespace",source_workload=~"$workload"'
NODE = 'node=~"$node"'
# process_* series of node agents / control-plane replicas (the same metric names
# come from both; `and on (instance)` keeps one kind).
NODE_PROC = ' and on (instance) weft_node_control_plane_connected'
CP_PROC = ' and on (instance) weft_cp_leader'


def quantiles(metric, selector, by=""):
    by_clause = f"le{', ' + by if by else ''}"
    label = f"{{{{{by}}}}} " if by else ""
    return [
        (f"histogram_quantile({q}, sum by ({by_clause}) (rate({metric}_bucket{{{selector}}}[5m])))", f"{label}p{int(q * 100)}")
        for q in (0.5, 0.9, 0.99)
    ]


def workload():
    b = Board("weft-workload", "weft / Workload",
              "One workload's traffic: who calls it and how it answers (inbound), whom it calls "
              "(outbound), latency and bytes.", ["namespace", "workload"])
    b.panel("Inbound requests / s by source",
            [(f"sum by (source_namespace, source_workload) (rate(weft_requests_total{{{WL_IN}}}[5m]))",
              "{{source_namespace}}/{{source_workload}}")], unit="reqps",
            description="HTTP requests handled at L7 by the destination's node proxy.")
    b.panel("Inbound responses / s by code",
            [(f"sum by (response_code) (rate(weft_requests_total{{{WL_IN}}}[5m]))", "{{response_code}}")],
            unit="reqps", description="403 = denied by a policy or a Wasm plugin.")
    b.panel("Request latency (destination proxy)", quantiles("weft_request_duration_seconds", WL_IN), unit="s",
            description="Request headers in to response headers out, at the destination's node proxy.")
    b.panel("Inbound connections / s by source and security",
            [(f"sum by (source_namespace, source_workload, connection_security_policy) (rate(weft_tcp_connections_opened_total{{{WL_IN}}}[5m]))",
              "{{source_namespace}}/{{source_workload}} ({{connection_security_policy}})")], unit="cps")
    b.panel("Outbound connections / s by destination",
            [(f"sum by (destination_namespace, destination_workload, connection_security_policy) (rate(weft_tcp_connections_opened_total{{{WL_OUT}}}[5m]))",
              "{{destination_namespace}}/{{destination_workload}} ({{connection_security_policy}})")], unit="cps")
    b.panel("Bytes / s (inbound and outbound)",
            [(f"sum(rate(weft_tcp_sent_bytes_total{{{WL_IN}}}[5m]) + rate(weft_tcp_received_bytes_total{{{WL_IN}}}[5m]))", "inbound"),
             (f"sum(rate(weft_tcp_sent_bytes_total{{{WL_OUT}}}[5m]) + rate(weft_tcp_received_bytes_total{{{WL_OUT}}}[5m]))", "outbound")],
            unit="Bps")
    b.panel("Failed connections / s",
            [(f"sum by (reporter) (rate(weft_tcp_connections_failed_total{{{WL_IN}}}[5m]) or rate(weft_tcp_connections_failed_total{{{WL_OUT}}}[5m]))",
              "{{reporter}}")], unit="cps",
            description="Connections that failed or were reset, including those denied after opening.")
    return b


def node():
    b = Board("weft-node-dataplane", "weft / Node dataplane",
              "Each node agent: traffic through its proxy, CPU and memory, enrolled pods, Wasm plugin "
              "health and eBPF capture status.", ["node"])
    b.panel("Control plane connected", [(f"min by (node) (weft_node_control_plane_connected{{{NODE}}})", "{{node}}")],
            kind="stat", w=6, h=4)
    b.panel("Enrolled pods", [(f"sum by (node) (weft_node_enrolled_pods{{{NODE}}})", "{{node}}")], kind="stat", w=6, h=4)
    b.panel("eBPF programs attached",
            [(f"sum by (node) (weft_node_ebpf_program_attached{{{NODE}}}) / count by (node) (weft_node_ebpf_program_attached{{{NODE}}})", "{{node}}")],
            kind="stat", unit="percentunit", w=6, h=4, description="Share of capture programs attached; below 100% means capture is broken.")
    b.panel("Soonest certificate expiry",
            [(f"min by (node) (weft_node_certificate_expiry_timestamp_seconds{{{NODE}}}) - time()", "{{node}}")],
            kind="stat", unit="s", w=6, h=4)
    b.row()
    b.panel("Connections opened / s", [(f"sum by (node, reporter) (rate(weft_tcp_connections_opened_total{{{NODE}}}[5m]))", "{{node}} {{reporter}}")], unit="cps")
    b.panel("Open connections",
            [(f"sum by (node) (weft_tcp_connections_opened_total{{{NODE}}}) - sum by (node) (weft_tcp_connections_closed_total{{{NODE}}})", "{{node}}")])
    b.panel("CPU (cores)", [(f"rate(process_cpu_seconds_total{{{NODE}}}[5m]){NODE_PROC}", "{{node}}")], unit="short")
    b.panel("Resident memory", [(f"process_resident_memory_bytes{{{NODE}}}{NODE_PROC}", "{{node}}")], unit="bytes")
    b.panel("Pooled HBONE connections (max over 5m)",
            [(f"sum by (node) (max_over_time(weft_hbone_pool_connections{{{NODE}}}[5m]))", "{{node}}")])
    b.panel("Authorization decisions / s",
            [(f"sum by (node, decision) (rate(weft_authz_decisions_total{{{NODE}}}[5m]))", "{{node}} {{decision}}")], unit="ops")
    b.panel("Wasm plugin calls / s", [(f"sum by (plugin) (rate(weft_wasm_plugin_calls_total{{{NODE}}}[5m]))", "{{plugin}}")], unit="ops")
    b.panel("Wasm plugin failures / s by kind",
            [(f"sum by (plugin, kind) (rate(weft_wasm_plugin_errors_total{{{NODE}}}[5m]))", "{{plugin}} {{kind}}")], unit="ops",
             description="deadline = CPU limit hit, memory = memory limit hit, trap, proc_exit...")
    b.panel("Wasm plugin memory (all instances)",
            [(f"sum by (plugin) (weft_wasm_plugin_memory_bytes{{{NODE}}})", "{{plugin}}")], unit="bytes")
    b.panel("Wasm plugins loaded", [(f"min by (plugin) (weft_wasm_plugin_loaded{{{NODE}}})", "{{plugin}}")],
            description="0: the module cannot run (see the WasmPlugin's status).")
    b.panel("eBPF map occupancy",
            [(f"max by (map) (weft_node_ebpf_map_entries{{{NODE}}} / weft_node_ebpf_map_capacity{{{NODE}}})", "{{map}}")],
            unit="percentunit")
    b.panel("Certificates: issued and rotated / h",
            [(f"sum by (node) (increase(weft_node_certificate_issuances_total{{{NODE}}}[1h]))", "{{node}} issued"),
             (f"sum by (node) (increase(weft_node_certificate_rotations_total{{{NODE}}}[1h]))", "{{node}} rotated"),
             (f"sum by (node) (increase(weft_node_certificate_errors_total{{{NODE}}}[1h]))", "{{node}} errors")])
    b.panel("Config updates and NACKs / min",
            [(f"sum by (node) (rate(weft_node_config_updates_total{{{NODE}}}[5m])) * 60", "{{node}} updates"),
             (f"sum by (node) (rate(weft_node_config_nacks_total{{{NODE}}}[5m])) * 60", "{{node}} NACKs")])
    b.panel("Access log records dropped / s",
            [(f"sum by (node, decision) (rate(weft_node_access_log_dropped_total{{{NODE}}}[5m]))", "{{node}} {{decision}}")],
            unit="ops", description="Records over --access-log-rate.")
    return b


def control_plane():
    b = Board("weft-control-plane", "weft / Control plane",
              "Config distribution (push latency, NACKs), connected nodes, certificate issuance and the CA.", [])
    b.panel("Connected nodes", [("max(weft_cp_connected_nodes)", "nodes")], kind="stat", w=6, h=4)
    b.panel("Leader replicas", [("sum(weft_cp_leader)", "leaders")], kind="stat", w=6, h=4,
            description="Exactly 1 when healthy.")
    b.panel("CA expires in", [("min(weft_cp_ca_expiry_timestamp_seconds) - time()", "CA")], kind="stat", unit="s", w=6, h=4)
    b.panel("Rejected config objects", [("max(weft_cp_source_errors)", "objects")], kind="stat", w=6, h=4,
            description="Manifests or objects the control plane could not use; their status (or its log) says why.")
    b.row()
    b.panel("Push latency", quantiles("weft_cp_push_latency_seconds", ""), unit="s",
            description="A change in the model to its update queued for a node.")
    b.panel("Pushes / s", [("sum(rate(weft_cp_pushes_total[5m]))", "updates"),
                           ("sum(rate(weft_cp_pushed_resources_total[5m]))", "resources")], unit="ops")
    b.panel("NACKs / min by node", [("sum by (node) (rate(weft_cp_nacks_total[5m])) * 60", "{{node}}")])
    b.panel("Resources by kind", [("max by (kind) (weft_cp_resources)", "{{kind}}")])
    b.panel("Certificates signed / s", [("sum(rate(weft_cp_certificates_signed_total[5m]))", "signed")], unit="ops")
    b.panel("Certificate refusals / s by reason",
            [("sum by (reason) (rate(weft_cp_certificate_refusals_total[5m]))", "{{reason}}")], unit="ops")
    b.panel("Node authentication refusals / s",
            [("sum by (reason) (rate(weft_cp_node_auth_refusals_total[5m]))", "{{reason}}")], unit="ops")
    b.panel("CPU (cores)",
            [(f"rate(process_cpu_seconds_total[5m]){CP_PROC}", "{{instance}} CPU")], unit="short")
    b.panel("Resident memory", [(f"process_resident_memory_bytes{CP_PROC}", "{{instance}}")], unit="bytes")
    return b


BOARDS = [overview, workload, node, control_plane]


def render():
    return {f"{b().uid}.json": json.dumps(b().json(), indent=2, sort_keys=True) + "\n" for b in BOARDS}


if __name__ == "__main__":
    for name, text in render().items():
        (HERE / name).write_text(text)
        print("wrote", HERE / name)
