#!/usr/bin/env bash
# Start the RabbitMQ that stalk's amqp tests and benchmark use, on loopback only.
#
# Idempotent: installs the Debian package when rabbitmq-server is missing (needs root, as in CI),
# starts a detached node when none answers, waits until it has booted, and prints the AMQP URL.
# A node that was already running is left alone and is not stopped by stop-rabbitmq.sh: only what
# this script started is recorded in $STALK_RABBITMQ_STATE (default /tmp/stalk-rabbitmq).
set -euo pipefail

state_dir=${STALK_RABBITMQ_STATE:-/tmp/stalk-rabbitmq}
url=${STALK_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}
boot_timeout_s=${STALK_RABBITMQ_BOOT_TIMEOUT_S:-120}

say() { echo "start-rabbitmq: $*" >&2; }

if ! command -v rabbitmq-server >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        say "rabbitmq-server is not installed and installing it needs root (apt-get install rabbitmq-server)"
        exit 1
    fi
    say "installing rabbitmq-server (Debian package)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq rabbitmq-server >/dev/null
fi

mkdir -p "$state_dir"

# Loopback only: AMQP listener, Erlang distribution and epmd. Set before the first rabbitmqctl
# call, which starts epmd itself when none runs.
export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
export ERL_EPMD_ADDRESS=127.0.0.1
export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
epmd_was_running=false
pgrep -x epmd >/dev/null 2>&1 && epmd_was_running=true

if rabbitmqctl -q ping >/dev/null 2>&1; then
    say "a RabbitMQ node is already running; using it"
else
    if [ "$epmd_was_running" = false ]; then
        touch "$state_dir/epmd-started"
    fi
    say "starting a detached node"
    rabbitmq-server -detached
    touch "$state_dir/node-started"
    # await_startup gives up at once while the node is not registered yet, so ping first.
    deadline=$((SECONDS + boot_timeout_s))
    until rabbitmqctl -q ping >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            say "node did not come up within ${boot_timeout_s}s; see /var/log/rabbitmq/"
            exit 1
        fi
        sleep 1
    done
fi

rabbitmqctl -q await_startup --timeout "$boot_timeout_s" >/dev/null
# Print the URL without the password.
echo "$url" | sed -E 's#(//[^:/@]+):[^@]*@#\1:***@#'
