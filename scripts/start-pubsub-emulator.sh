#!/usr/bin/env bash
# Check that the Google Cloud Pub/Sub emulator can run for stalk's pubsub tests and benchmark.
#
# The tests start their own emulator (free loopback port, one per session, stopped by PID), so
# this script only checks the pieces and leaves nothing running: the Cloud SDK's
# pubsub-emulator component (or STALK_PUBSUB_EMULATOR=/path/to/cloud-pubsub-emulator), Java 11+,
# and the google-cloud-pubsub client. scripts/test fails the run when this fails and CI=true.
set -euo pipefail

say() { echo "start-pubsub-emulator: $*" >&2; }

launcher=${STALK_PUBSUB_EMULATOR:-}
if [ -z "$launcher" ]; then
    for root in "${CLOUDSDK_ROOT_DIR:-}" /usr/lib/google-cloud-sdk \
        "$(command -v gcloud >/dev/null 2>&1 && dirname "$(dirname "$(readlink -f "$(command -v gcloud)")")")"; do
        [ -n "$root" ] || continue
        if [ -x "$root/platform/pubsub-emulator/bin/cloud-pubsub-emulator" ]; then
            launcher="$root/platform/pubsub-emulator/bin/cloud-pubsub-emulator"
            break
        fi
    done
fi
if [ -z "$launcher" ] || [ ! -x "$launcher" ]; then
    say "no emulator: gcloud components install pubsub-emulator (or apt-get install" \
        "google-cloud-cli-pubsub-emulator), or set STALK_PUBSUB_EMULATOR"
    exit 1
fi
if ! command -v java >/dev/null 2>&1; then
    say "the emulator needs Java 11+ on PATH"
    exit 1
fi
if ! "${PYTHON:-python3}" -c 'import google.pubsub_v1' 2>/dev/null; then
    say "google-cloud-pubsub is not installed: pip install -e '.[pubsub]'"
    exit 1
fi
say "emulator: $launcher ($(java -version 2>&1 | head -1))"
