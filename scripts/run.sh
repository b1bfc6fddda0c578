#!/usr/bin/env bash
# make run: build signal, start a local testnet (3 coordinators, 2 nodes) on
# the embedded default model, run examples/simple_example.py against it, and
# summarise. KEEP=1 leaves the testnet running afterwards.
#
# Environment: SIGNAL_PYTHON (default /usr/bin/python3, else python3),
# TESTNET_DIR (default .cache/testnet), COORDINATORS, NODES, KEEP, STEPS.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${SIGNAL_BIN:-$ROOT/bin/signal}
DIR=${TESTNET_DIR:-$ROOT/.cache/testnet}
COORDINATORS=${COORDINATORS:-3}
NODES=${NODES:-2}
STEPS=${STEPS:-20}
KEEP=${KEEP:-0}

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
elapsed() { echo "$(( $(date +%s) - $1 ))s"; }

PY=${SIGNAL_PYTHON:-/usr/bin/python3}
if ! [ -x "$PY" ]; then PY=$(command -v python3 || true); fi
if [ -z "$PY" ]; then echo "make run: no Python found (set SIGNAL_PYTHON)" >&2; exit 1; fi

t0=$(date +%s)
if ! [ -x "$BIN" ] || [ -n "$(find cmd testnet node coordinator trainer protocol client ledger internal -name '*.go' -newer "$BIN" 2>/dev/null | head -1)" ]; then
  say "building $BIN (the first build takes a few minutes: libp2p, raft, OpenBLAS bindings)"
  mkdir -p "$(dirname "$BIN")"
  go build -o "$BIN" ./cmd/signal
  echo "    built in $(elapsed "$t0")"
fi

# A testnet left running from an earlier KEEP=1 is stopped first: it holds the directory.
if [ -f "$DIR/testnet.pid" ]; then
  say "stopping the testnet already running in $DIR"
  "$BIN" testnet stop --dir "$DIR" || true
fi

mkdir -p "$DIR"
# Files of an earlier run would read as "ready" before this testnet is.
rm -f "$DIR/testnet.line" "$DIR/testnet.json"
LOG="$DIR/testnet.log"
if ! [ -f "$DIR/models/signal-tiny/.signal-generated" ]; then
  say "generating the default model signal-tiny into $DIR/models (once; a few seconds)"
fi
say "starting a testnet: $COORDINATORS coordinators (raft), $NODES nodes, in $DIR (log: $LOG)"
t1=$(date +%s)
"$BIN" testnet --coordinators "$COORDINATORS" --nodes "$NODES" --dir "$DIR" >"$DIR/testnet.line" 2>"$LOG" &
TN_PID=$!

stop_testnet() {
  if kill -0 "$TN_PID" 2>/dev/null; then
    say "stopping the testnet"
    kill -TERM "$TN_PID" 2>/dev/null || true
    wait "$TN_PID" 2>/dev/null || true
  fi
}
on_exit() {
  rc=$?
  if [ "$KEEP" = 1 ] && [ $rc -eq 0 ]; then return; fi
  stop_testnet
  exit $rc
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# Wait for testnet.json, with a progress line every 5 s.
n=0
while ! [ -s "$DIR/testnet.line" ]; do
  if ! kill -0 "$TN_PID" 2>/dev/null; then
    echo "make run: the testnet exited before it was ready; its log ends:" >&2
    tail -20 "$LOG" >&2
    exit 1
  fi
  sleep 0.2
  n=$((n + 1))
  if [ $((n % 25)) -eq 0 ]; then echo "    ... still starting ($(elapsed "$t1")): $(tail -1 "$LOG" | sed 's/^time=[^ ]* //' | cut -c1-110)"; fi
done
echo "    ready in $(elapsed "$t1")"
TESTNET_JSON="$DIR/testnet.json"
"$PY" - "$TESTNET_JSON" <<'EOF'
import json, sys
tn = json.load(open(sys.argv[1]))
print("    coordinators: " + "  ".join(tn["coordinators"]))
print("    nodes:        " + "  ".join(n[:16] + "..." for n in tn["nodes"]))
print("    models:       " + ", ".join(tn["models"]))
EOF

say "running examples/simple_example.py ($STEPS steps) with $PY"
OUT="$DIR/example.out"
set +e
"$PY" -u examples/simple_example.py --testnet "$TESTNET_JSON" --steps "$STEPS" 2>&1 | tee "$OUT" | sed 's/^/    /'
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
  echo "make run: the example failed (exit $rc); testnet log: $LOG, member logs: $DIR/logs" >&2
  exit "$rc"
fi

say "summary"
"$PY" - "$OUT" "$TESTNET_JSON" "$KEEP" "$DIR" <<'EOF'
import json, sys
out, tnpath, keep, d = sys.argv[1:5]
summary = None
samples = []
for line in open(out):
    if line.startswith("SUMMARY "):
        summary = json.loads(line[len("SUMMARY "):])
    elif line.strip().startswith("sample "):
        samples.append(line.strip()[len("sample "):].strip())
tn = json.load(open(tnpath))
if summary is None:
    print("    the example printed no SUMMARY line"); sys.exit(1)
losses = summary["losses"]
def spark(xs):
    bars = "▁▂▃▄▅▆▇█"
    lo, hi = min(xs), max(xs)
    return "".join(bars[0 if hi == lo else int((x - lo) / (hi - lo) * 7)] for x in xs)
trend = "falling" if losses[-1] < losses[0] else "NOT falling"
print("    loss:        %.4f -> %.4f over %d steps (%s)  %s" % (losses[0], losses[-1], len(losses), trend, spark(losses)))
if samples:
    print("    first sample: " + samples[0])
    print("    last sample:  " + samples[-2 if len(samples) > 1 else -1])
    if len(samples) > 1:
        print("                  " + samples[-1])
print("    cost:        %d.%06d credits (balance %d.%06d)" % (divmod(summary["cost_micro_credits"], 1_000_000) + divmod(summary["balance_micro_credits"] or 0, 1_000_000)))
print("    checkpoint:  " + summary["checkpoint_uri"])
print("    testnet:     " + tnpath + " (coordinator URLs, API key, admin token)")
if keep == "1":
    print("    dashboard:   %s?key=%s" % (tn["dashboard"], tn["api_key"]))
    print("    the testnet is still running (KEEP=1). Try:")
    print("      SIGNAL_URL=%s SIGNAL_API_KEY=%s bin/signal runs list" % (tn["coordinators"][0], tn["api_key"]))
    print("    stop it with:  bin/signal testnet stop --dir %s" % d)
else:
    print("    the testnet stops now; KEEP=1 make run keeps it running.")
sys.exit(0 if losses[-1] < losses[0] else 1)
EOF
