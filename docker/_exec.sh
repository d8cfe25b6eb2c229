# shellcheck shell=bash
# Shared by the scripts in docker/: the docker client, the usage text, printing or running a command.
DOCKER="${DOCKER:-docker}"  # the docker client (DOCKER=/usr/bin/docker picks one of several)

# The usage text is the script's leading comment block (line 2 to the first line that is not a comment).
usage() {
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

run_or_print() {
    local dry_run="$1"
    shift
    if [ "$dry_run" -eq 1 ]; then
        printf '%q ' "$@"
        echo
        return 0
    fi
    if ! command -v "$1" >/dev/null 2>&1; then
        echo "error: $1 is not installed; see https://docs.docker.com/engine/install/" >&2
        return 1
    fi
    exec "$@"
}
