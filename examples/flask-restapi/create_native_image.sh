#!/usr/bin/env bash
# Build the Flask example's native image, native_flask_restapi_image, with podman or docker.
#
# The base is a public Python image when one can be pulled, else the local Debian image that
# scripts/build-base-image makes (localhost/enclavify/python-base:bookworm), built on demand.
# Environment: ENGINE (podman or docker; default: whichever is found first), BASE (force a
# base image), IMAGE (default native_flask_restapi_image).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
image=${IMAGE:-native_flask_restapi_image}
public_base=python:3.11-alpine
local_base=localhost/enclavify/python-base:bookworm

if [[ -z ${CONTAINERS_CONF:-} && ! -d /run/systemd/system && -f $top/tests/fixtures/containers.conf ]]; then
    export CONTAINERS_CONF=$top/tests/fixtures/containers.conf
fi
engine=${ENGINE:-$(command -v podman || command -v docker || true)}
if [[ -z $engine ]]; then
    echo "create_native_image.sh: neither podman nor docker is installed" >&2
    exit 1
fi

base=${BASE:-}
if [[ -z $base ]]; then
    if "$engine" image inspect "$public_base" >/dev/null 2>&1 \
            || timeout 60 "$engine" pull -q "docker.io/library/$public_base" >/dev/null 2>&1; then
        base=$public_base
    else
        echo "create_native_image.sh: cannot pull $public_base; using $local_base" >&2
        "$engine" image inspect "$local_base" >/dev/null 2>&1 || "$top/scripts/build-base-image"
        base=$local_base
    fi
fi

echo "create_native_image.sh: building $image from $base with $engine" >&2
previous=$("$engine" image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
"$engine" build --build-arg "BASE=$base" -t "$image" -f "$here/Dockerfile" "$here"

# A rebuild that makes a new image (always, with BUILDAH_LAYERS=false) moves the tag and
# leaves the image it named before untagged. Remove that one, unless another tag still names
# it or a container uses it (rmi without -f then refuses).
current=$("$engine" image inspect --format '{{.Id}}' "$image")
if [[ -n $previous && $previous != "$current" ]] \
        && [[ $("$engine" image inspect --format '{{len .RepoTags}}' "$previous" 2>/dev/null) == 0 ]]; then
    "$engine" rmi "$previous" >/dev/null 2>&1 || true
fi
