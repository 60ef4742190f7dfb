"""Print deploy/kubernetes/prometheusrule.yaml: the groups of alerts.yml as a Prometheus Operator PrometheusRule.

    python deploy/prometheus/prometheusrule.py > deploy/kubernetes/prometheusrule.yaml

alerts.yml stays the one source; tests/test_deploy.py fails when the manifest no longer matches it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HEADER = """\
# Generated from deploy/prometheus/alerts.yml; do not edit. Regenerate with
#   python deploy/prometheus/prometheusrule.py > deploy/kubernetes/prometheusrule.yaml
# `release: kube-prometheus-stack` is the label kube-prometheus-stack's Prometheus selects rules by (its
# ruleSelector is `release: <helm release name>`): change it to your release's name, or to whatever your
# Prometheus resource's ruleSelector asks for (`kubectl get prometheus -A -o yaml | grep -A3 ruleSelector`).
"""


def manifest() -> str:
    """The PrometheusRule manifest for alerts.yml, as YAML text."""
    rules = yaml.safe_load((Path(__file__).parent / "alerts.yml").read_text(encoding="utf-8"))
    document = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "task-bridge",
            "labels": {"app.kubernetes.io/name": "task-bridge", "release": "kube-prometheus-stack"},
        },
        "spec": {"groups": rules["groups"]},
    }
    return HEADER + yaml.safe_dump(document, sort_keys=False, width=120, allow_unicode=True)


if __name__ == "__main__":
    sys.stdout.write(manifest())
