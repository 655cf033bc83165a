#!/usr/bin/env python3
"""Checks the provisioned Grafana dashboard against a live Prometheus.

Usage: check_dashboard.py DASHBOARD.json DATASOURCES.yml PROMETHEUS_URL

Every panel must query the provisioned data source (by uid), and every
metric a panel names must exist in Prometheus after a run, so the dashboard
shows data on first start. murmur_refusals_total exists only once something
was refused; it may be absent.
"""
import json
import re
import sys
import urllib.request

MAY_BE_ABSENT = {"murmur_refusals_total"}

dashboard = json.load(open(sys.argv[1]))
uid = re.search(r"^\s*uid:\s*(\S+)", open(sys.argv[2]).read(), re.M).group(1)
with urllib.request.urlopen(sys.argv[3] + "/api/v1/label/__name__/values", timeout=10) as r:
    known = set(json.load(r)["data"])
failed = []
for panel in dashboard["panels"]:
    for target in panel["targets"]:
        if target["datasource"]["uid"] != uid or panel["datasource"]["uid"] != uid:
            failed.append(f"{panel['title']}: data source is not {uid}")
        for name in re.findall(r"murmur_[a-z_]+", target["expr"]):
            if name not in known and name not in MAY_BE_ABSENT:
                failed.append(f"{panel['title']}: no {name} in Prometheus")
print(f"compose-test: dashboard: {len(dashboard['panels'])} panels, "
      f"{'all with data' if not failed else 'FAILED'}")
for f in failed:
    print(f"compose-test:   {f}")
sys.exit(1 if failed else 0)
