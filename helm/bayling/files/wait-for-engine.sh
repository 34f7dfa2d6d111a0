#!/bin/sh
# Serving pods' init container: wait until the engine on the (read-only) volume is complete.
#
#   MARKER          the file whose presence means "complete": the build Job's ready marker, or
#                   manifest.json of an engine folder that already exists
#   EXPECT_HASH     if set, the marker must record this spec hash (a marker of another build is refused)
#   TIMEOUT_SECONDS give up after this long (default 43200); the pod then restarts the wait
#   POLL_SECONDS    how often to look (default 10)
#   BUILD_JOB       the Job that writes the marker, named in the log lines
set -eu
: "${MARKER:?MARKER is not set}"
TIMEOUT_SECONDS="${TIMEOUT_SECONDS:-43200}"
POLL_SECONDS="${POLL_SECONDS:-10}"
BUILD_JOB="${BUILD_JOB:-}"

log() { echo "[wait-for-engine] $(date -u +%Y-%m-%dT%H:%M:%SZ) $*"; }
if [ -n "$BUILD_JOB" ]; then
  hint="the build Job $BUILD_JOB writes it: kubectl logs -f job/$BUILD_JOB"
else
  hint="put a complete engine folder (with manifest.json) there"
fi

start=$(date +%s)
last=-60
while [ ! -f "$MARKER" ]; do
  waited=$(( $(date +%s) - start ))
  if [ "$waited" -ge "$TIMEOUT_SECONDS" ]; then
    log "ERROR: the engine is not ready after ${waited}s: $MARKER does not exist ($hint)"
    exit 1
  fi
  if [ $(( waited - last )) -ge 60 ]; then
    log "waiting for the engine: $MARKER does not exist yet, waited ${waited}s of ${TIMEOUT_SECONDS}s ($hint)"
    last=$waited
  fi
  sleep "$POLL_SECONDS"
done
if [ -n "${EXPECT_HASH:-}" ] && ! grep -q "\"spec_hash\": \"$EXPECT_HASH\"" "$MARKER"; then
  log "ERROR: $MARKER was written for another build spec (expected $EXPECT_HASH): $(cat "$MARKER")"
  exit 1
fi
log "engine ready: $MARKER"
