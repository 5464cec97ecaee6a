#!/usr/bin/env bash
# Checks docker/observability: the Prometheus alert rules with
# `promtool check rules` (promtool from Debian's `prometheus` package,
# installed with apt-get when missing), the Prometheus configuration with
# `promtool check config`, and that every Grafana dashboard is JSON whose
# queries name only metrics keel exports (docs/observability.md).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=docker/observability

if ! command -v promtool >/dev/null 2>&1; then
  echo "check-observability: installing promtool (Debian package prometheus)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool --version 2>&1 | head -n 1

promtool check rules "$dir/alerts.yml"
# The configuration names the rules at their path inside the container.
config="$(mktemp -d "${TMPDIR:-/tmp}/keel-prometheus.XXXXXX")"
trap 'rm -rf "$config"' EXIT
sed "s#/etc/prometheus/alerts.yml#$PWD/$dir/alerts.yml#" "$dir/prometheus.yml" >"$config/prometheus.yml"
promtool check config "$config/prometheus.yml"

python3 - "$dir" docs/observability.md <<'PY'
import json, pathlib, re, sys
root, doc = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]).read_text()
exported = set(re.findall(r"`(keel_[a-z_]+)`", doc))
suffixes = ("_bucket", "_sum", "_count")
def base(name):
    for suffix in suffixes:
        if name.endswith(suffix) and name[: -len(suffix)] in exported:
            return name[: -len(suffix)]
    return name
sources = [(path, [t["expr"] for p in json.loads(path.read_text())["panels"] for t in p.get("targets", [])])
           for path in sorted((root / "grafana" / "dashboards").glob("*.json"))]
sources.append((root / "alerts.yml", [(root / "alerts.yml").read_text()]))
unknown = set()
for path, exprs in sources:
    for expr in exprs:
        unknown |= {name for name in re.findall(r"\bkeel_[a-z_]+", expr) if base(name) not in exported}
    print(f"{path}: {len(exprs)} queries, JSON and metric names ok" if path.suffix == ".json" else f"{path}: metric names ok")
if unknown:
    sys.exit(f"check-observability: metrics keel does not export: {sorted(unknown)}")
PY
echo "check-observability: ok"
