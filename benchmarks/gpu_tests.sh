#!/usr/bin/env bash
# Run the GPU tests (marker `gpu`) on one GPU in several pytest processes at
# once: the collected test ids are dealt round-robin to JOBS processes (so
# each gets a share of every test file), each process logs to its own file,
# and a summary line per process is printed at the end.  Exit status 1 if
# any process failed, timed out or collected nothing.
#
#   bash benchmarks/gpu_tests.sh            # from the repository root
#
# Environment: JOBS (default 6), LIMIT (seconds per process, default 600),
# LOGS (log folder, default gpu-test-logs), MARK (default gpu), TESTS
# (paths, default tests).
set -uo pipefail
JOBS=${JOBS:-6}
LIMIT=${LIMIT:-600}
LOGS=${LOGS:-gpu-test-logs}
MARK=${MARK:-gpu}
TESTS=${TESTS:-tests}
mkdir -p "$LOGS"
rm -f "$LOGS"/part_*
python3 -m pytest -q -p no:cacheprovider -m "$MARK" --collect-only $TESTS > "$LOGS/collect.txt" 2>&1
grep "::" "$LOGS/collect.txt" > "$LOGS/ids.txt"
n=$(wc -l < "$LOGS/ids.txt")
if [ "$n" -eq 0 ]; then
    echo "no tests collected with -m '$MARK' (CuPy installed, a GPU visible?):"
    tail -n 5 "$LOGS/collect.txt"
    exit 1
fi
# round-robin, so that the slow tests of one file spread over the processes
awk -v jobs="$JOBS" -v dir="$LOGS" '{ print > sprintf("%s/part_%02d.ids", dir, (NR - 1) % jobs) }' \
    "$LOGS/ids.txt"
for part in "$LOGS"/part_*.ids; do
    mapfile -t ids < "$part"  # (test ids may hold spaces)
    timeout "$LIMIT" python3 -m pytest -q -p no:cacheprovider -m "$MARK" "${ids[@]}" \
        > "${part%.ids}.log" 2>&1 &
done
wait
status=0
echo "$n tests in $(ls "$LOGS"/part_*.ids | wc -l) processes:"
for part in "$LOGS"/part_*.ids; do
    log="${part%.ids}.log"
    last=$(tail -n 1 "$log")
    echo "  $(basename "$log"): $(wc -l < "$part") ids; $last"
    grep -E "^(FAILED|ERROR)" "$log" | head -5 | sed 's/^/    /'
    case "$last" in
        *failed*|*error*|*" no tests ran"*) status=1 ;;
        *passed*|*skipped*) ;;
        *) echo "    (no summary: cut by the $LIMIT s limit?)"; status=1 ;;
    esac
done
exit $status
