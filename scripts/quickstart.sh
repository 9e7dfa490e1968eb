#!/usr/bin/env bash
# Install enclavekit into .venv and run the main job end to end: `enclavekit quickstart` builds the example enclave
# application (examples/quickstart) into an EIF, starts the KMS and vsock-proxy, shows the enclave attesting and
# decrypting a secret that only its PCR0 may decrypt, shows a changed image being denied, validates the audit
# trail, prints a summary and cleans up.  Enclaves need root: run this script as root (or it re-runs the
# quickstart with sudo).  Extra arguments go to `enclavekit quickstart` (e.g. --json, --keep).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_env.sh
source scripts/_env.sh
ensure_venv
ek="$VENV/bin/enclavekit"

if [ "$(id -u)" -eq 0 ]; then
    exec "$ek" quickstart "$@"
elif command -v sudo >/dev/null 2>&1; then
    echo "enclaves need root: running the quickstart with sudo" >&2
    exec sudo "$ek" quickstart "$@"
else
    echo "enclaves need root: run scripts/quickstart.sh as root" >&2
    exit 1
fi
