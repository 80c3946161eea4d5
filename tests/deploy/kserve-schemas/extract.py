"""Regenerate the KServe schemas the manifests are checked against, from KServe's own CRDs.

    python tests/deploy/kserve-schemas/extract.py CRD.yaml VERSION OUT.json.gz

KServe publishes the OpenAPI v3 schema of each custom resource in its CRD files
(config/crd/full/serving.kserve.io_<plural>.yaml in the kserve/kserve repository); this keeps
one version's ``openAPIV3Schema`` with the descriptions stripped (they are most of the size and
none of the rules). SOURCE.txt beside this file names the KServe commit they came from."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: strip(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def main() -> None:
    crd_file, version, out = sys.argv[1:4]
    crd = yaml.safe_load(Path(crd_file).read_text())
    (found,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strip(found["schema"]["openAPIV3Schema"])
    doc = {"group": crd["spec"]["group"], "kind": crd["spec"]["names"]["kind"], "version": version}
    text = json.dumps(doc | {"schema": schema}, sort_keys=True, separators=(",", ":"))
    Path(out).write_bytes(gzip.compress(text.encode(), mtime=0))


if __name__ == "__main__":
    main()
