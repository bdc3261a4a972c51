#!/usr/bin/env bash
# Bounded fuzzing of the parsers of untrusted input (fuzz/README.md): builds every target under
# fuzz/ once, runs each for FUZZ_SECONDS (default 45) from its committed seeds, prints how many
# inputs each ran, and fails if any target crashes, hangs or runs out of memory.
#
#   bash .ci/fuzz.sh                          # every target, 45 s each (CI)
#   FUZZ_SECONDS=600 bash .ci/fuzz.sh         # longer, on demand
#   FUZZ_SECONDS=600 bash .ci/fuzz.sh topic   # some targets only
#   FUZZ_SANITIZER=address bash .ci/fuzz.sh   # with AddressSanitizer (slower build and runs)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"

seconds=${FUZZ_SECONDS:-45}
# The gateway's only unsafe code is its Mbed TLS bindings and AES-NI (src/dtls/), so by default the
# targets run without a sanitizer: the build is faster and libFuzzer runs more inputs in the same
# time. FUZZ_SANITIZER=address checks the bindings' side (Mbed TLS's C is not instrumented).
sanitizer=${FUZZ_SANITIZER:-none}
# cargo-fuzz passes nightly-only flags (coverage instrumentation, sanitizers); the stable
# toolchain accepts them with this.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> cargo install cargo-fuzz --locked"
    cargo install cargo-fuzz --locked
fi

# cargo-fuzz has no --locked: this fails if fuzz/Cargo.lock is not up to date.
cargo metadata --locked --format-version 1 >/dev/null

if (($# > 0)); then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

# Every `cargo fuzz` call gets the same build flags, so `run` finds the targets built.
build_flags=(--sanitizer "$sanitizer")

echo "==> cargo fuzz build (${targets[*]})"
start=$SECONDS
if (($# > 0)); then
    for target in "${targets[@]}"; do
        cargo fuzz build "${build_flags[@]}" "$target"
    done
else
    cargo fuzz build "${build_flags[@]}"
fi
echo "built in $((SECONDS - start)) s"

# Runs one target; its output goes to a log, its exit status to a file next to it.
run() {
    local target=$1 status=0
    # New inputs libFuzzer finds go to a directory of their own under target/, kept between
    # runs; the committed seeds under corpus/ stay as they are.
    local work=target/corpus/$target log=target/logs/$target.log
    mkdir -p "$work" target/logs
    rm -f "target/logs/$target.status"
    # -timeout: one input running 10 s is a hang; -rss_limit_mb: the endpoint's state is
    # bounded, so growing past 2 GB is a leak.
    cargo fuzz run "${build_flags[@]}" "$target" "$work" "corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1 </dev/null || status=$?
    echo "$status" >"target/logs/$target.status"
}

# Targets run side by side, one per CPU: each still gets a whole core for its time.
parallel=${FUZZ_JOBS:-$(nproc)}
echo "==> run ${targets[*]}: ${seconds} s each, ${parallel} at a time"
for target in "${targets[@]}"; do
    while (($(jobs -rp | wc -l) >= parallel)); do
        wait -n || true
    done
    run "$target" &
done
wait

failed=()
for target in "${targets[@]}"; do
    log=target/logs/$target.log
    status=$(cat "target/logs/$target.status" 2>/dev/null || echo "unknown")
    executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    echo "$target: ${executions:-?} executions in ${seconds} s, exit status $status"
    if [[ $status != 0 ]]; then
        tail -n 60 "$log" >&2
        failed+=("$target")
    fi
done

if ((${#failed[@]} > 0)); then
    echo "fuzzing failed: ${failed[*]}; the failing input is in fuzz/artifacts/<target>/" >&2
    exit 1
fi
echo "fuzzing passed: ${targets[*]}"
