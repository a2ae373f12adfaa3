#!/usr/bin/env bash
# Stop the RabbitMQ node (and epmd) that start-rabbitmq.sh started; leave any other node alone.
set -euo pipefail

state_dir=${STALK_RABBITMQ_STATE:-/tmp/stalk-rabbitmq}

if [ -f "$state_dir/node-started" ]; then
    rabbitmqctl -q stop || echo "stop-rabbitmq: rabbitmqctl stop failed (already stopped?)" >&2
    rm -f "$state_dir/node-started"
else
    echo "stop-rabbitmq: no node started by start-rabbitmq.sh; nothing to stop" >&2
fi
if [ -f "$state_dir/epmd-started" ]; then
    epmd -kill >/dev/null 2>&1 || true
    rm -f "$state_dir/epmd-started"
fi
