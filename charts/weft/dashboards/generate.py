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
        "namespace": "label_values(weft_tcp_connections_opened_total, destination_namespace)",
        "workload": "label_values(weft_tcp_connections_opened_total{destination_namespace=~\"$namespace\"}, destination_workload)",
        "node": "label_values(weft_node_control_plane_connected, instance)",
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


BOARDS = [overview]


def render():
    return {f"{b().uid}.json": json.dumps(b().json(), indent=2, sort_keys=True) + "\n" for b in BOARDS}


if __name__ == "__main__":
    for name, text in render().items():
        (HERE / name).write_text(text)
        print("wrote", HERE / name)
