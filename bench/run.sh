#!/usr/bin/env bash
# The usersync end-to-end benchmark: builds the release binary, then runs
# benches/e2e.rs, which starts its own throw-away PostgreSQL and prints one
# Markdown table. Sizes: BENCH_* environment variables (see BENCHMARKS.md);
# BENCH_QUICK=1 is a smoke run of well under a minute.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
cargo bench --bench e2e
