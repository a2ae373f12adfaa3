#!/usr/bin/env bash
# Make nsqd and nsqlookupd 1.3.0 available for stalk's nsq tests and benchmark.
#
# The tests start their own nsqd (free loopback ports, temp data dir), so this script only
# provides the binaries and leaves nothing running. Idempotent: nsqd on PATH or already in the
# cache -> nothing to do. Otherwise it builds them with Go into a cache OUTSIDE the checkout,
# ${STALK_NSQ_BUILD:-$HOME/.cache/stalk-nsq}/bin.
#
# Why a wrapper module: `go install github.com/nsqio/nsq/apps/nsqd@v1.3.0` is refused, because
# nsq's go.mod has a `replace` directive (and the module proxy answers 403 on its version list).
# A throwaway module that requires nsq v1.3.0, repeats the replace and imports both apps builds.
set -euo pipefail

version=v1.3.0
cache=${STALK_NSQ_BUILD:-$HOME/.cache/stalk-nsq}
bin="$cache/bin"

say() { echo "start-nsqd: $*" >&2; }

if command -v nsqd >/dev/null 2>&1 && command -v nsqlookupd >/dev/null 2>&1; then
    say "nsqd on PATH: $(command -v nsqd) ($(nsqd --version 2>&1 | head -1))"
    exit 0
fi
if [ -x "$bin/nsqd" ] && [ -x "$bin/nsqlookupd" ]; then
    say "nsqd in cache: $bin/nsqd ($("$bin/nsqd" --version 2>&1 | head -1))"
    exit 0
fi
if ! command -v go >/dev/null 2>&1; then
    say "nsqd is not on PATH nor in $bin, and building it needs Go (https://go.dev/dl/)"
    exit 1
fi

src="$cache/src"
rm -rf "$src"
mkdir -p "$src" "$bin"
cat >"$src/go.mod" <<MOD
module stalk.local/nsqbuild

go 1.21

require github.com/nsqio/nsq $version

// nsq's own go.mod carries this replace; a module depending on nsq must repeat it.
replace github.com/judwhite/go-svc => github.com/mreiferson/go-svc v1.2.2-0.20210815184239-7a96e00010f6
MOD
cat >"$src/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "github.com/nsqio/nsq/apps/nsqd"
	_ "github.com/nsqio/nsq/apps/nsqlookupd"
)
GO

say "building nsqd and nsqlookupd $version into $bin (about 30 s with empty Go caches)"
(
    cd "$src"
    export GOFLAGS=-mod=mod GOBIN="$bin"
    go mod tidy >/dev/null
    go install github.com/nsqio/nsq/apps/nsqd github.com/nsqio/nsq/apps/nsqlookupd
)
"$bin/nsqd" --version >&2
echo "$bin/nsqd"
