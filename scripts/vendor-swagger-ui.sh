#!/usr/bin/env bash
# Vendors Swagger UI (the npm package swagger-ui-dist, pinned below) into
# crates/edge/assets/swagger-ui/: its minified bundle, stylesheet and
# license. Run once when the pin changes and commit the result; the build
# (include_bytes! in crates/edge/src/docs.rs) and keel at run time need no
# network. `npm pack` fetches the tarball from the registry and this script
# checks it against the pinned integrity before anything is copied.
#
#   bash scripts/vendor-swagger-ui.sh
set -euo pipefail

version="5.35.0"
integrity="sha512-U06rpMtW9V3XPGOBeamTUSr0Z09jMX4IJuANpE/EZbAhw0G8CgwrzU4YmXkn/h0wCDNsXdGarTNNHC3sU8yVUQ=="
files=(swagger-ui-bundle.js swagger-ui.css LICENSE)

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/crates/edge/assets/swagger-ui"
work="$(mktemp -d "${TMPDIR:-/tmp}/keel-swagger-ui.XXXXXX")"
trap 'rm -rf "$work"' EXIT

cd "$work"
npm pack --silent --json "swagger-ui-dist@$version" >pack.json
got="$(python3 -c 'import json,sys; print(json.load(open("pack.json"))[0]["integrity"])')"
if [[ "$got" != "$integrity" ]]; then
  echo "vendor-swagger-ui: integrity mismatch for swagger-ui-dist@$version: got $got" >&2
  exit 1
fi
tar -xzf "swagger-ui-dist-$version.tgz"
mkdir -p "$dest"
for file in "${files[@]}"; do
  cp "package/$file" "$dest/$file"
done
echo "$version" >"$dest/VERSION"
echo "vendor-swagger-ui: swagger-ui-dist@$version -> ${dest#"$root"/}"
ls -l "$dest"
