# Shared by scripts/quickstart.sh and scripts/test.sh: a project-local virtualenv, installed from the
# committed constraints file so that every machine gets the same versions.
VENV="${ENCLAVEKIT_VENV:-$PWD/.venv}"
# ensure_venv [EXTRA]: the package alone (the quickstart), or with an extra such as "dev" (the test suite's tools,
# real clients and servers).  Each combination is installed once and again only when pyproject.toml or
# constraints.txt change.
ensure_venv() {
    local extra="${1:-}"
    local py="${PYTHON:-python3}"
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "enclavekit needs Python >= 3.11 (found: $("$py" --version 2>&1))" >&2
        exit 1
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        if ! "$py" -m venv --help >/dev/null 2>&1 || ! "$py" -c 'import ensurepip' >/dev/null 2>&1; then
            # Debian and Ubuntu ship venv separately
            if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
                DEBIAN_FRONTEND=noninteractive apt-get update -qq
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            else
                echo "Python's venv module is missing: install python3-venv (Debian/Ubuntu), then run again" >&2
                exit 1
            fi
        fi
        "$py" -m venv "$VENV"
    fi
    local stamp="$VENV/.installed${extra:+-$extra}"
    local target="."
    [ -n "$extra" ] && target=".[$extra]"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e "$target"
        touch "$stamp"
    fi
}
