#!/usr/bin/env bash
# The Flask example end to end, on this machine, with a local CAS (SQLite, TLS on :8081):
#
#   1. build the native image (native_flask_restapi_image),
#   2. start a CAS in a scratch directory,
#   3. convert the image and upload its session with sconify_image, the SECRETS and
#      INJECTED_FILES hooks of hooks.sh in the environment,
#   4. start the confidential container with the compose file sconify_image wrote,
#   5. POST and GET patient_3 over TLS, verified against the CA certificate that the CAS
#      exports from the session (curl --cacert, not -k),
#   6. stop everything and remove what it made.
#
# Usage: examples/flask-restapi/run-walkthrough.sh [--pause | --keep | --help]
#   --pause  once the requests have succeeded, wait for a line on stdin (Enter) before
#            cleaning up, to try the running service by hand
#   --keep   leave the container, the CAS, the images and the scratch directory in place
#   --help   print this text
#
# Environment: NATIVE_IMAGE and IMAGE name the native and the confidential image (default
# native_flask_restapi_image and flask_restapi_image); CAS_PORT is the CAS's port (8081);
# COMPOSE is the compose command (default: podman-compose, docker compose, podman compose or
# docker-compose, the first one installed);
# BASE is the base image, which must have the Debian layout (default: the local Debian
# base, built with scripts/build-base-image when missing).
# Both images are removed at the end, and so is everything else the script made.
#
# The directories protected here follow the Debian layout of the local base image:
# /usr/lib/python3.11 (the standard library), /usr/lib/python3 (Flask and its
# dependencies), /usr/local/lib, /home, /app and /tls. On an image built from the public
# python image, use /usr/local/lib and /usr/local/bin/python3 instead.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
keep=false
pause=false
case ${1:-} in
    --keep) keep=true ;;
    --pause) pause=true ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    "") ;;
    *) echo "usage: $0 [--pause | --keep | --help]" >&2; exit 2 ;;
esac
native_image=${NATIVE_IMAGE:-native_flask_restapi_image}
image=${IMAGE:-flask_restapi_image}

"$top/scripts/setup"
# shellcheck source=../../scripts/env
source "$top/scripts/env"

work=$(mktemp -d -t enclavify-walkthrough.XXXXXX)
cas_port=${CAS_PORT:-8081}
export ENCLAVIFY_CAS_DATA=$work/cas
# The walk-through's client identity lives in the scratch directory, not in your home.
export XDG_CONFIG_HOME=$work/config
cas_pid=
# The first compose implementation found, unless COMPOSE names one ("docker compose", say).
if [[ -n ${COMPOSE:-} ]]; then
    read -r -a compose <<<"$COMPOSE"
elif command -v podman-compose >/dev/null; then
    compose=(podman-compose)
elif docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif podman compose version >/dev/null 2>&1; then
    compose=(podman compose)
elif command -v docker-compose >/dev/null; then
    compose=(docker-compose)
else
    echo "run-walkthrough: no compose found: install podman-compose, docker compose" \
        "or docker-compose" >&2
    exit 1
fi
engine=$(command -v podman || command -v docker)

cleanup() {
    local status=$?
    if $keep; then
        cat >&2 <<TEXT
run-walkthrough: kept everything running. The scratch directory is $work.
  talk to the CAS:  ENCLAVIFY_CAS_DATA=$work/cas XDG_CONFIG_HOME=$work/config \\
                      $top/.venv/bin/enclavify session show ${SESSION:-SESSION} --cas localhost:$cas_port
  call the API:     curl --cacert $work/api-ca.crt --resolve api:4996:127.0.0.1 https://api:4996/patient/patient_3
                    (the server certificate is valid for the name api only, hence --resolve)
  clean up:         (cd $work && ${compose[*]} down); kill ${cas_pid:-CAS_PID}; \\
                      $engine rmi $image $native_image; rm -rf $work
TEXT
        exit $status
    fi
    if [[ -f $work/docker-compose.yml ]]; then
        (cd "$work" && "${compose[@]}" down >/dev/null 2>&1) || true
    fi
    if [[ -n $cas_pid ]]; then
        kill "$cas_pid" 2>/dev/null || true
        wait "$cas_pid" 2>/dev/null || true
    fi
    "$engine" rmi -f "$image" "$native_image" >/dev/null 2>&1 || true
    rm -rf "$work"
    echo "run-walkthrough: removed the service, the CAS, both example images and $work" >&2
    exit $status
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*" >&2; }
# Print a command before running it, so the output shows exactly what was called.
show() { printf '+ %s\n' "$*" >&2; "$@"; }

step "Step 1: the native image $native_image"
# The directories and the binary below are those of the Debian base, so the native image is
# built from it even where a public Python image could be pulled.
base=${BASE:-localhost/enclavify/python-base:bookworm}
if [[ -z ${BASE:-} ]]; then
    "$top/scripts/build-base-image" >&2   # does nothing when the image exists
fi
# BUILDAH_LAYERS=false: podman keeps no intermediate images that the clean-up would miss.
BASE=$base IMAGE=$native_image BUILDAH_LAYERS=false "$here/create_native_image.sh" >&2

step "Step 2: a local CAS on 127.0.0.1:$cas_port (data in $ENCLAVIFY_CAS_DATA)"
enclavify cas serve --data "$ENCLAVIFY_CAS_DATA" --listen "127.0.0.1:$cas_port" \
    >"$work/cas.log" 2>&1 &
cas_pid=$!
for _ in $(seq 100); do
    if [[ -f $ENCLAVIFY_CAS_DATA/ca.pem ]] && curl -fsS --cacert "$ENCLAVIFY_CAS_DATA/ca.pem" \
            "https://localhost:$cas_port/v1/openapi.json" >/dev/null 2>&1; then
        break
    fi
    kill -0 "$cas_pid" 2>/dev/null || { cat "$work/cas.log" >&2; exit 1; }
    sleep 0.2
done
if ! curl -fsS --cacert "$ENCLAVIFY_CAS_DATA/ca.pem" "https://localhost:$cas_port/v1/openapi.json" \
        >/dev/null 2>&1; then
    echo "run-walkthrough: the CAS did not respond on 127.0.0.1:$cas_port within 20 s; its log follows" >&2
    cat "$work/cas.log" >&2
    exit 1
fi

step "Step 3: convert the image and upload its session with sconify_image"
# shellcheck source=hooks.sh
source "$here/hooks.sh"
export NATIVE_IMAGE=$native_image
export IMAGE=$image
export SCONE_CAS_ADDR=localhost:$cas_port
export NAMESPACE="my_namespace-$RANDOM"
export BINARY=/usr/bin/python3
export SCONE_HEAP=1G SCONE_STACK=4M SCONE_ALLOW_DLOPEN=2
cd "$work"
SESSION=$(sconify_image --namespace="$NAMESPACE" --create-namespace --name=flask \
    --from="$NATIVE_IMAGE" --to="$IMAGE" --cas="$SCONE_CAS_ADDR" \
    --dir="/home" --dir="/usr/local/lib" --dir="/app" --dir="/usr/lib/python3" \
    --dir="/usr/lib/python3.11" --dir="/tls" \
    --heap="$SCONE_HEAP" --stack="$SCONE_STACK" --dlopen="$SCONE_ALLOW_DLOPEN" \
    --binary="$BINARY")
export SESSION
echo "session: $SESSION" >&2

step "Step 4: run the confidential image"
# The compose file uses the host's network because the CAS listens on the host's loopback
# interface only. The API therefore listens on 0.0.0.0:4996 of this machine.
DEVICE=$(determine_sgx_device)
export DEVICE
"${compose[@]}" up -d >&2

step "Step 5: the session's CA certificate, exported by the CAS"
show enclavify session values "$SESSION" --cas "$SCONE_CAS_ADDR" > values.json
python3 - values.json > api-ca.crt <<'PY'
import json, sys
values = json.load(open(sys.argv[1]))
print(values["api_ca_cert"], end="")
PY

url=https://api:4996
# A request for an unknown patient returns 404 once the server is up and its certificate verifies.
code=000
for _ in $(seq 150); do
    code=$(curl -s -o /dev/null -w '%{http_code}' --cacert api-ca.crt \
        --resolve api:4996:127.0.0.1 "$url/patient/none" || true)
    [[ $code == 404 ]] && break
    sleep 0.2
done
if [[ $code != 404 ]]; then
    echo "run-walkthrough: the confidential service did not respond over verified TLS within 30 s; its logs follow" >&2
    "${compose[@]}" logs >&2 || true
    exit 1
fi

step "Step 6: POST /patient/patient_3, TLS verified against that CA"
show curl -fsS --cacert api-ca.crt --resolve api:4996:127.0.0.1 -X POST "$url/patient/patient_3" \
    -d "fname=Jane&lname=Doe&address='123 Main Street'&city=Richmond&state=Washington&ssn=123-223-2345&email=nr@aaa.com&dob=01/01/2010&contactphone=123-234-3456&drugallergies='Sulpha, Penicillin, Tree Nut'&preexistingconditions='diabetes, hypertension, asthma'&dateadmitted=01/05/2010&insurancedetails='Primera Blue Cross'"
echo

step "Step 7: GET /patient/patient_3"
show curl -fsS --cacert api-ca.crt --resolve api:4996:127.0.0.1 -X GET "$url/patient/patient_3"
echo

step "Step 8: the server's certificate, verified against the session's CA for the name api"
openssl s_client -connect 127.0.0.1:4996 -servername api -verify_hostname api \
    -CAfile api-ca.crt -verify_return_error </dev/null 2>/dev/null \
    | grep -E '^Verify return code' >&2
openssl s_client -connect 127.0.0.1:4996 -servername api </dev/null 2>/dev/null \
    | openssl x509 -noout -subject -issuer -ext subjectAltName >&2
printf 'CA certificate: ' >&2
openssl x509 -in api-ca.crt -noout -subject -fingerprint -sha256 | paste -sd' ' >&2

if $pause; then
    echo "run-walkthrough: the service answers at $url (--resolve api:4996:127.0.0.1," \
        "--cacert $work/api-ca.crt); press Enter to stop it and clean up" >&2
    read -r _ || true
fi
step "Done"
