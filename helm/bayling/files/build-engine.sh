#!/usr/bin/env bash
# Build a BayLing engine onto a shared volume, once, safely (the chart's build Job runs this).
#
#   build-engine.sh [BAYLING_BUILD_ARGS...]     extra arguments go to `bayling build` verbatim
#
# Steps: skip if the ready marker exists -> take the volume's lock -> look again -> fetch the
# weights (Hugging Face or a mounted volume) -> `bayling merge` for a delta release ->
# `bayling build` -> write the ready marker (last, atomically) -> release the lock.
# Every step can be re-run: downloads resume, a finished merge/engine is kept, and a Job that
# is killed anywhere leaves a lock that the next attempt recognizes as stale.
#
# Environment (the chart sets all of these):
#   DATA_DIR            the engine volume (read-write)                 e.g. /data
#   ENGINE_DIR          the engine folder to build                     e.g. /data/engines/bayling-13b-v1.1-trtllm-int8-wo-<hash>
#   READY_FILE          the ready marker, written last                 default: $ENGINE_DIR.ready
#   SPEC_HASH           hash of every value that shapes the engine (the marker records it)
#   SPEC_JSON           those values, for people reading the marker    default: {}
#   MODEL_NAME          the name shown to clients (bayling build --name)
#   WEIGHTS_SOURCE      huggingface | volume
#   MODEL_REPO, MODEL_REVISION   Hugging Face repo of the release (full weights, or the delta)
#   DELTA               true when the release is a weight difference over LLaMA
#   BASE_REPO, BASE_REVISION     Hugging Face repo of the base (delta releases)
#   MODEL_DIR, BASE_DIR          for WEIGHTS_SOURCE=volume: the mounted folders
#   HF_TOKEN            optional, from an existing Secret (read by the Hugging Face CLI itself)
#   KEEP_DOWNLOADS      true|false: keep downloaded and merged weights after the build (default true)
#   LOCK_STALE_SECONDS  a lock whose heartbeat is older than this is stale (default 300)
#   HEARTBEAT_SECONDS   how often the holder refreshes its heartbeat (default 30)
#   LOCK_WAIT_SECONDS   give up waiting for another builder after this long (default 43200)
#   POLL_SECONDS        how often a waiter looks again (default 10)
#   POD_NAME            recorded in the lock's owner file
set -euo pipefail

: "${DATA_DIR:?DATA_DIR is not set}" "${ENGINE_DIR:?ENGINE_DIR is not set}" "${SPEC_HASH:?SPEC_HASH is not set}"
READY_FILE="${READY_FILE:-$ENGINE_DIR.ready}"
SPEC_JSON="${SPEC_JSON:-"{}"}"
MODEL_NAME="${MODEL_NAME:-$(basename "$ENGINE_DIR")}"
WEIGHTS_SOURCE="${WEIGHTS_SOURCE:-huggingface}"
DELTA="${DELTA:-false}"
KEEP_DOWNLOADS="${KEEP_DOWNLOADS:-true}"
LOCK_STALE_SECONDS="${LOCK_STALE_SECONDS:-300}"
HEARTBEAT_SECONDS="${HEARTBEAT_SECONDS:-30}"
LOCK_WAIT_SECONDS="${LOCK_WAIT_SECONDS:-43200}"
POLL_SECONDS="${POLL_SECONDS:-10}"
LOCK="$DATA_DIR/.bayling-build.lock"
HOST="$(uname -n)"
TOKEN="$HOST-$$-$(date +%s)-${RANDOM}"
HEARTBEAT_PID=""
CHILD_PID=""
HOLDING=false

log() { echo "[build-engine] $(date -u +%Y-%m-%dT%H:%M:%SZ) $*"; }
die() { log "ERROR: $*"; exit 1; }
now() { date +%s; }
mtime() { stat -c %Y "$1" 2>/dev/null || echo 0; }

# Run a long command so that SIGTERM (pod deletion) reaches it and our EXIT trap still runs.
run() {
  log "+ $*"
  set -m              # the command gets its own process group: a signal reaches all its children
  "$@" &
  CHILD_PID=$!
  set +m
  local rc=0
  wait "$CHILD_PID" || rc=$?
  CHILD_PID=""
  return "$rc"
}

on_signal() {
  log "received a termination signal; stopping"
  if [ -n "$CHILD_PID" ]; then
    kill -TERM -- "-$CHILD_PID" 2>/dev/null || kill -TERM "$CHILD_PID" 2>/dev/null || true
    wait "$CHILD_PID" 2>/dev/null || true
  fi
  exit 143
}
trap on_signal TERM INT
trap release_lock EXIT

ready() {
  [ -f "$READY_FILE" ] && grep -q "\"spec_hash\": \"$SPEC_HASH\"" "$READY_FILE"
}

# --- the lock: a directory (mkdir is atomic, also on NFS), with owner info and a heartbeat -----
lock_owner() { tr '\n' ' ' 2>/dev/null < "$LOCK/owner" || true; }

lock_age() {
  local hb
  hb="$(mtime "$LOCK/heartbeat")"
  [ "$hb" = 0 ] && hb="$(mtime "$LOCK")"   # the owner file may not be written yet
  echo $(( $(now) - hb ))
}

lock_is_stale() {
  [ -d "$LOCK" ] || return 1
  local age host pid
  age="$(lock_age)"
  if [ "$age" -gt "$LOCK_STALE_SECONDS" ]; then
    log "lock is stale: no heartbeat for ${age}s (limit ${LOCK_STALE_SECONDS}s); owner: $(lock_owner)"
    return 0
  fi
  # Same pod (restarted container): the owner's process is gone, or its pid is now ours.
  host="$(sed -n 's/^host=//p' "$LOCK/owner" 2>/dev/null || true)"
  pid="$(sed -n 's/^pid=//p' "$LOCK/owner" 2>/dev/null || true)"
  if [ -n "$host" ] && [ -n "$pid" ] && [ "$host" = "$HOST" ]; then
    if [ "$pid" = "$$" ] || ! kill -0 "$pid" 2>/dev/null; then
      log "lock is stale: its owner (pid $pid on this host) is no longer running; owner: $(lock_owner)"
      return 0
    fi
  fi
  return 1
}

# Breaking a stale lock is itself guarded, so that two waiters never both break one lock and
# then remove each other's fresh one.
break_stale_lock() {
  local guard="$LOCK.takeover"
  if ! mkdir "$guard" 2>/dev/null; then
    if [ $(( $(now) - $(mtime "$guard") )) -gt 60 ]; then rm -rf "$guard"; fi
    return 0
  fi
  if lock_is_stale; then
    local graveyard="$LOCK.stale.$TOKEN"
    mv "$LOCK" "$graveyard" 2>/dev/null && rm -rf "$graveyard"
    log "removed the stale lock"
  fi
  rmdir "$guard" 2>/dev/null || true
}

acquire_lock() {
  mkdir -p "$DATA_DIR"
  local start last_report=-60
  start="$(now)"
  while true; do
    if mkdir "$LOCK" 2>/dev/null; then
      printf 'token=%s\nhost=%s\npid=%s\npod=%s\nstarted=%s\nspec_hash=%s\n' \
        "$TOKEN" "$HOST" "$$" "${POD_NAME:-}" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$SPEC_HASH" > "$LOCK/owner"
      touch "$LOCK/heartbeat"
      HOLDING=true
      ( nap=""
        trap '[ -n "$nap" ] && kill "$nap" 2>/dev/null; exit 0' TERM
        trap - INT EXIT
        while true; do
          sleep "$HEARTBEAT_SECONDS" & nap=$!
          wait "$nap" || true
          grep -q "^token=$TOKEN\$" "$LOCK/owner" 2>/dev/null || exit 0
          touch "$LOCK/heartbeat"
        done ) </dev/null >/dev/null 2>&1 &
      HEARTBEAT_PID=$!
      log "lock taken: $LOCK"
      return 0
    fi
    if lock_is_stale; then break_stale_lock; sleep 1; continue; fi
    local waited=$(( $(now) - start ))
    if [ "$waited" -ge "$LOCK_WAIT_SECONDS" ]; then
      die "gave up after ${waited}s waiting for the lock $LOCK held by: $(lock_owner)"
    fi
    if [ $(( waited - last_report )) -ge 60 ]; then
      log "waiting for another build to finish (lock $LOCK held by: $(lock_owner)); waited ${waited}s"
      last_report="$waited"
    fi
    sleep "$POLL_SECONDS"
  done
}

release_lock() {
  local rc=$?
  if [ -n "$HEARTBEAT_PID" ]; then kill "$HEARTBEAT_PID" 2>/dev/null || true; wait "$HEARTBEAT_PID" 2>/dev/null || true; fi
  if [ "$HOLDING" = true ] && grep -q "^token=$TOKEN\$" "$LOCK/owner" 2>/dev/null; then
    rm -rf "$LOCK"
    log "lock released"
  fi
  HOLDING=false
  return "$rc"
}

# --- the steps -----------------------------------------------------------------------------------
hf_download() {  # repo revision dest
  local repo="$1" revision="$2" dest="$3"
  if [ -f "$dest/.bayling-download-complete" ]; then
    log "already downloaded: $repo@$revision -> $dest"
    return 0
  fi
  mkdir -p "$dest"
  if command -v hf >/dev/null 2>&1; then
    run hf download "$repo" --revision "$revision" --local-dir "$dest"
  elif command -v huggingface-cli >/dev/null 2>&1; then
    run huggingface-cli download "$repo" --revision "$revision" --local-dir "$dest"
  else
    die "neither 'hf' nor 'huggingface-cli' is installed in this image (pip install huggingface_hub)"
  fi
  echo "$repo@$revision" > "$dest/.bayling-download-complete"
}

safe_name() { echo "$1" | tr '/:@ ' '____'; }

fetch_weights() {
  case "$WEIGHTS_SOURCE" in
    huggingface)
      : "${MODEL_REPO:?MODEL_REPO is not set}"
      MODEL_SRC="$DATA_DIR/downloads/$(safe_name "$MODEL_REPO")@${MODEL_REVISION:-main}"
      hf_download "$MODEL_REPO" "${MODEL_REVISION:-main}" "$MODEL_SRC"
      if [ "$DELTA" = true ]; then
        : "${BASE_REPO:?BASE_REPO is not set: a delta release needs its LLaMA base}"
        BASE_SRC="$DATA_DIR/downloads/$(safe_name "$BASE_REPO")@${BASE_REVISION:-main}"
        hf_download "$BASE_REPO" "${BASE_REVISION:-main}" "$BASE_SRC"
      fi
      ;;
    volume)
      : "${MODEL_DIR:?MODEL_DIR is not set}"
      [ -d "$MODEL_DIR" ] || die "weights folder $MODEL_DIR does not exist on the weights volume"
      MODEL_SRC="$MODEL_DIR"
      if [ "$DELTA" = true ]; then
        : "${BASE_DIR:?BASE_DIR is not set: a delta release needs its LLaMA base}"
        [ -d "$BASE_DIR" ] || die "base folder $BASE_DIR does not exist on the weights volume"
        BASE_SRC="$BASE_DIR"
      fi
      ;;
    *) die "WEIGHTS_SOURCE must be huggingface or volume, not '$WEIGHTS_SOURCE'" ;;
  esac
}

merge_delta() {
  if [ "$DELTA" != true ]; then CHECKPOINT="$MODEL_SRC"; return 0; fi
  CHECKPOINT="$DATA_DIR/merged/$(basename "$ENGINE_DIR")"
  if [ -f "$CHECKPOINT/.bayling-merge-complete" ]; then
    log "already merged: $CHECKPOINT"
    return 0
  fi
  mkdir -p "$(dirname "$CHECKPOINT")"
  # bayling merge resumes an interrupted output by itself
  run bayling merge --base "$BASE_SRC" --delta "$MODEL_SRC" --output "$CHECKPOINT"
  date -u +%Y-%m-%dT%H:%M:%SZ > "$CHECKPOINT/.bayling-merge-complete"
}

build_engine() {
  if [ -f "$ENGINE_DIR/manifest.json" ]; then
    log "engine already complete (manifest.json present): $ENGINE_DIR"
    return 0
  fi
  mkdir -p "$(dirname "$ENGINE_DIR")"
  local force=()
  [ -e "$ENGINE_DIR" ] && force=(--force)   # an unfinished folder from an interrupted build
  run bayling build --model "$CHECKPOINT" --output "$ENGINE_DIR" --name "$MODEL_NAME" "${force[@]}" "$@"
  [ -f "$ENGINE_DIR/manifest.json" ] || die "bayling build finished but $ENGINE_DIR/manifest.json is missing"
}

write_ready_marker() {
  local tmp="$READY_FILE.tmp.$TOKEN"
  printf '{\n  "spec_hash": "%s",\n  "engine_dir": "%s",\n  "built_at": "%s",\n  "built_by": "%s",\n  "spec": %s\n}\n' \
    "$SPEC_HASH" "$ENGINE_DIR" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "${POD_NAME:-$HOST}" "$SPEC_JSON" > "$tmp"
  sync "$tmp" 2>/dev/null || true
  mv "$tmp" "$READY_FILE"
  log "ready marker written: $READY_FILE"
}

cleanup_downloads() {
  [ "$KEEP_DOWNLOADS" = true ] && return 0
  [ "$WEIGHTS_SOURCE" = huggingface ] && rm -rf "$MODEL_SRC" "${BASE_SRC:-}"
  [ "$DELTA" = true ] && rm -rf "$CHECKPOINT"
  log "removed downloaded and merged weights (KEEP_DOWNLOADS=false)"
}

main() {
  if ready; then log "engine already built for spec $SPEC_HASH: $READY_FILE; nothing to do"; return 0; fi
  acquire_lock
  if ready; then log "another builder finished spec $SPEC_HASH while we waited; nothing to do"; return 0; fi
  log "building $MODEL_NAME (spec $SPEC_HASH) into $ENGINE_DIR"
  fetch_weights
  merge_delta
  build_engine "$@"
  write_ready_marker
  cleanup_downloads
  log "done"
}

main "$@"
