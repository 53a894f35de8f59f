#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (FUZZ_SECONDS, default 60)
# after replaying the saved crash inputs (fuzz/regressions/TARGET/, if any).
# Exits non-zero if any target crashes; crash inputs land in
# fuzz/artifacts/TARGET/. Usage: fuzz/run.sh [TARGET...]
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
seconds="${FUZZ_SECONDS:-60}"

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked || exit 1

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(cache_ops plan_ops best_fit trace_parser)
fi

failed=()
for target in "${targets[@]}"; do
  start=$SECONDS
  printf '\n=== fuzz %s (%ss)\n' "$target" "$seconds"
  mkdir -p "fuzz/corpus/$target"
  extra=()
  if [ -f "fuzz/$target.dict" ]; then
    extra+=("-dict=fuzz/$target.dict")
  fi
  ok=1
  if [ -d "fuzz/regressions/$target" ] && [ -n "$(ls -A "fuzz/regressions/$target")" ]; then
    cargo +nightly fuzz run "$target" "fuzz/regressions/$target" -- -runs=0 || ok=0
  fi
  if [ "$ok" = 1 ]; then
    # The first directory receives new inputs; seeds/ is read only. libFuzzer
    # prints a line per new input: keep it in a log, show its end.
    mkdir -p fuzz/artifacts
    log="fuzz/artifacts/$target.log"
    cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
      -max_total_time="$seconds" -rss_limit_mb=4096 -timeout=30 -print_final_stats=1 \
      "${extra[@]}" > "$log" 2>&1 || ok=0
    if [ "$ok" = 1 ]; then
      grep -E '^(Done|stat::)' "$log" || tail -n 5 "$log"
    else
      tail -n 60 "$log"
    fi
  fi
  if [ "$ok" = 0 ]; then
    failed+=("$target")
  fi
  printf '=== fuzz %s: %s in %ss\n' "$target" "$([ "$ok" = 1 ] && echo ok || echo CRASHED)" \
    "$((SECONDS - start))"
done

if [ ${#failed[@]} -ne 0 ]; then
  printf '\nfuzz targets that crashed: %s (inputs in fuzz/artifacts/)\n' "${failed[*]}"
  exit 1
fi
