#!/usr/bin/env bash
# Validates the OpenAPI 3.1 document that keel generates from its contracts
# (`keel openapi`) with openapi-spec-validator.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PATH="$(scripts/tools.sh | tail -n 1):$PATH"
document="$(mktemp "${TMPDIR:-/tmp}/keel-openapi.XXXXXX.json")"
trap 'rm -f "$document"' EXIT
cargo run --quiet --bin keel -- openapi >"$document"
openapi-spec-validator "$document"
python3 - "$document" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
operations = sum(len(item) for item in doc["paths"].values())
print(f"openapi: {len(doc['paths'])} paths, {operations} operations, {len(doc['components']['schemas'])} schemas")
PY
