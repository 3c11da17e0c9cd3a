#!/usr/bin/env bash
# Fuzzes the bytes the relay takes from the network (fuzz/): the pgoutput decoder and the
# replication protocol framing, with libFuzzer through cargo-fuzz, each target for SECONDS
# (default 600) on its own core, starting from and adding to the corpus in fuzz/corpus/.
# A crash leaves its input in fuzz/artifacts/<target>/: add it to the corpus, and
# tests/fuzz_corpus.rs turns it into a regression test.
#
# cargo-fuzz needs nightly-only compiler flags; these machines have one stable toolchain, so
# RUSTC_BOOTSTRAP=1 lets it use them. No sanitizer (-s none): the code is safe Rust, and what
# is looked for are panics, overflows (checked: debug assertions are on) and hangs.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-600}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked --quiet cargo-fuzz
export RUSTC_BOOTSTRAP=1
cargo fuzz build -s none
pids=()
for target in pgoutput_decode replication_framing; do
  cargo fuzz run "$target" -s none -- -max_total_time="$SECONDS_EACH" -print_final_stats=1 \
    >"fuzz/$target.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
for target in pgoutput_decode replication_framing; do
  echo "== $target"; grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)|ERROR|panicked' "fuzz/$target.log" || true
done
# Keep the corpus small enough for the repository: only inputs that add coverage.
for target in pgoutput_decode replication_framing; do
  cargo fuzz cmin "$target" -s none >/dev/null 2>&1
done
exit $status
