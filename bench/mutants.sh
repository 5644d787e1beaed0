#!/usr/bin/env bash
# Mutation testing of the modules that own invariants (DESIGN.md, "Invariants"):
# cargo-mutants breaks the code one small edit at a time and runs the tests;
# a mutant the tests do not catch ("missed") is either a missing test or an
# equivalent change, and bench/MUTANTS.md says which.
#
#   cargo install cargo-mutants --locked
#   bash bench/mutants.sh                        # every owner module (hours)
#   bash bench/mutants.sh src/pipeline/ack.rs    # one file
#   MUTANTS_TESTS=lib bash bench/mutants.sh src/pipeline/ack.rs
#                                                # unit tests only (minutes)
#   MUTANTS_ARGS='--re is_pending' bash bench/mutants.sh src/pipeline/ack.rs
#                                                # only some mutants (see --list)
#
# Run by hand, not in CI: every mutant rebuilds the crate (the `mutants`
# profile in Cargo.toml: unoptimised, incremental, about 30 s) and runs the
# tests (the whole suite takes minutes; MUTANTS_FILTER below picks the
# modules that own the file's invariants, about 30 s). It runs --in-place, on the working tree and its target/
# directory (a copy would rebuild every dependency per run): do not edit or
# build in this tree meanwhile. cargo-mutants restores each file after its
# mutant; a killed run can leave one mutated, so the script refuses a dirty
# tree and checks it is clean again at the end. Output: target/mutants.out/
# (outcomes.json, caught.txt, missed.txt, timeout.txt, unviable.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-mutants >/dev/null || {
  echo "cargo-mutants is not installed: cargo install cargo-mutants --locked" >&2
  exit 2
}
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "the working tree has changes; commit or stash them first (mutants run in place)" >&2
  exit 2
fi

# The modules of the issue "every invariant has a test that fails": the
# pipeline (the ack rule and the loop), the source (the origin filter, the
# rows and values it decodes), the guarded write-back, the sinks (ids,
# idempotency, retry). Not pipeline/memory.rs: the in-memory store the unit
# tests use, itself test code.
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  files=(src/pipeline/ack.rs src/pipeline/mod.rs src/pipeline/requests.rs src/pipeline/ports.rs
         src/source/stream.rs src/source/pgoutput.rs src/source/rows.rs src/source/value.rs
         src/store/writeback.rs
         src/sink/mod.rs src/sink/retry.rs src/sink/ratelimit.rs src/sink/mapping.rs
         src/sink/fence.rs src/sink/http.rs src/sink/list.rs
         src/sink/webhook src/sink/memberstack src/sink/stripe)
fi
args=()
for f in "${files[@]}"; do
  if [ -d "$f" ]; then args+=(--file "$f/**/*.rs"); else args+=(--file "$f"); fi
done

# MUTANTS_TESTS=lib: only the library's unit tests (src/pipeline/tests.rs and
# the modules' own tests), which run without PostgreSQL. Anything missed then
# must be re-run with the full suite before it is called missed.
# MUTANTS_FILTER='pipeline:: spine::': the unit tests and the `it` tests
# whose names contain one of the words (the test modules DESIGN.md's
# invariant table names for the file); a mutant missed by them is re-run
# with the whole suite before it is called missed.
test_args=()
if [ "${MUTANTS_TESTS:-all}" = lib ]; then
  # deep_json_is_stack_safe: see below.
  test_args=(-- --lib -- --skip deep_json_is_stack_safe)
elif [ -n "${MUTANTS_FILTER:-}" ]; then
  # shellcheck disable=SC2206 # the words are the filters
  # deep_json_is_stack_safe measures release-sized stack frames on a
  # 512 KiB thread; unoptimised frames overflow it.
  test_args=(-- --lib --test it -- ${MUTANTS_FILTER} --skip deep_json_is_stack_safe)
fi

status=0
cargo mutants --in-place --no-shuffle \
  --profile "${MUTANTS_PROFILE:-mutants}" \
  --output target \
  --timeout "${MUTANTS_TIMEOUT:-900}" --build-timeout "${MUTANTS_BUILD_TIMEOUT:-1200}" \
  ${MUTANTS_ARGS:-} "${args[@]}" "${test_args[@]}" || status=$?

if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "WARNING: the tree is not clean after the run: git diff, then git checkout the mutated file" >&2
fi
for k in caught missed timeout unviable; do
  printf '%-9s %s\n' "$k" "$(wc -l < "target/mutants.out/$k.txt" 2>/dev/null || echo 0)"
done
# cargo-mutants exits 2 when mutants were missed, 3 on timeouts.
exit "$status"
