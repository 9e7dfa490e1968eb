#!/usr/bin/env bash
# Install enclavekit into .venv and run the main job: build the example enclave image (EIF) from examples/hello,
# describe it, and show that a second build measures the same (reproducible PCRs).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_env.sh
source scripts/_env.sh
ensure_venv
ek="$VENV/bin/enclavekit"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "== build-enclave: examples/hello -> hello.eif" >&2
"$ek" build-enclave --docker-uri dir:examples/hello/rootfs --cmd /app/hello.sh --name hello \
    --output-file "$work/hello.eif" > "$work/build.json"
cat "$work/build.json"

echo "== describe-eif hello.eif" >&2
"$ek" describe-eif --eif-path "$work/hello.eif"

echo "== a second build measures the same" >&2
"$ek" build-enclave --docker-uri dir:examples/hello/rootfs --cmd /app/hello.sh --name hello \
    --output-file "$work/again.eif" > "$work/again.json"
if cmp -s "$work/build.json" "$work/again.json"; then
    echo "PCRs identical across builds" >&2
else
    echo "PCRs differ between two builds of the same input" >&2
    exit 1
fi
