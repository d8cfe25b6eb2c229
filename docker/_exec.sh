# shellcheck shell=bash
# Shared by build_docker.sh and run_docker.sh: print the docker command (--dry-run) or run it.
run_or_print() {
    local dry_run="$1"
    shift
    if [ "$dry_run" -eq 1 ]; then
        printf '%q ' "$@"
        echo
        return 0
    fi
    if ! command -v docker >/dev/null 2>&1; then
        echo "error: docker is not installed; see https://docs.docker.com/engine/install/" >&2
        return 1
    fi
    exec "$@"
}
