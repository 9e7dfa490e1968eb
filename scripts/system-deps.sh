# Sourced by scripts/test.sh: system packages the tests need (Debian/Ubuntu names).
#   gcc        static C probes run inside sandboxes
#   postgresql the KMS store's PostgreSQL backend (tests start their own server in a temp dir)
#   openssl    CMS interoperability checks
#   golang-go  an unmodified Go program (standard library only) run inside an enclave
#   golang-github-mdlayher-vsock-dev  the real github.com/mdlayher/vsock library, built unchanged (GOPATH mode,
#              GOPATH=/usr/share/gocode) for an enclave client (pulls in golang-github-mdlayher-socket-dev)
# Missing packages are installed with apt-get when running as root; otherwise the script says what to install.
ensure_system_deps() {
    local missing=()
    command -v gcc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    command -v go >/dev/null 2>&1 || missing+=(golang-go)
    [ -d /usr/share/gocode/src/github.com/mdlayher/vsock ] || missing+=(golang-github-mdlayher-vsock-dev)
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "the tests need these system packages: ${missing[*]} (install them, then run again)" >&2
        exit 1
    fi
    echo "installing system packages: ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # Debian starts a cluster on install; the tests run their own servers, so stop the packaged one.
    if command -v pg_ctlcluster >/dev/null 2>&1; then
        for c in /etc/postgresql/*/main; do
            [ -d "$c" ] || continue
            v=$(basename "$(dirname "$c")")
            pg_ctlcluster "$v" main stop >/dev/null 2>&1 || true
        done
    fi
}
