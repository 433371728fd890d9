"""Reads Prometheus text-format exposition with prometheus_client's own
parser (the reference Python client) and prints one JSON line per sample:
{"family", "type", "name", "labels", "value"}. A page the parser rejects
fails the run.

Also: `rules FILE` prints the `expr` of every rule of a Prometheus rule file
as JSON lines, read with PyYAML (the names in them are checked by the
tests against what the processes export).
"""

import json
import sys


def samples(path):
    from prometheus_client.parser import text_string_to_metric_families

    with open(path, encoding="utf-8") as f:
        text = f.read()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            print(
                json.dumps(
                    {
                        "family": family.name,
                        "type": family.type,
                        "name": s.name,
                        "labels": s.labels,
                        "value": s.value,
                    }
                )
            )


def rules(path):
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    for group in doc["groups"]:
        for rule in group["rules"]:
            print(json.dumps({"rule": rule.get("alert") or rule.get("record"), "expr": str(rule["expr"])}))


if __name__ == "__main__":
    if sys.argv[1] == "rules":
        rules(sys.argv[2])
    else:
        samples(sys.argv[1])
