#!/usr/bin/env bash
# The benchmarks a GPU session runs, after its loads are unpacked (tools/device/README.md).
#   bash tools/device/run.sh MODE [MODE ...]
# Modes (device minutes are scarce: pick what the open issues need):
#   engine    issue 15: engine against the model alone and MONAI, 9 and 16 blocks (16 also
#             with its sums in host memory, and with none handed over), compiled
#   configs   issue 15: the model-alone configuration search, and the engine alone (--no-model)
#   train     issue 17: trainer against a bare loop, batch 1 and 4, compiled; loader on 16 cores
#   snemi     issues 17, 21: bench snemi3d (RECIPE=snemi3d_aff, ITER=3000, DEVICE=cuda;
#             a call cut short resumes in the next: the run folder stays on the warm machine)
#   final     issue 17: bench snemi3d --final after snemi (all 70 sections, a model package)
#   segment   issue 20: bench segment with 1, 2 and 4 workers on the machine's cores
#   quick     every bench above but snemi and final on tiny sizes and the CPU (no compile):
#             try this script before a session (snemi and final: see the README's stand-in)
# Each step writes its JSON line to $OUT/NAME.json and its log to $OUT/NAME.log; one failed
# step does not stop the others, and the script exits 1 at the end, naming the failed steps.
# DEADLINE=540 (seconds from the script's start) sends SIGTERM to the step still running then
# and starts no other: training checkpoints and stops, so the call ends inside the device's
# 600 s and the same command continues snemi or final in the next call (exit 124 till then).
set -uo pipefail
cd "$(dirname "$0")/../.."
STATE=${EMRUN_DEVICE:-/tmp/emrun-device}
OUT=${OUT:-$STATE/out}
WORK=${WORK:-$STATE/work}
mkdir -p "$OUT" "$WORK"
export PYTHONPATH="$STATE/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$STATE/site/bin:$PATH"

emrun() {  # DEADLINE=S: stop (SIGTERM) what still runs S seconds after this script started
    [ -n "${DEADLINE:-}" ] || { python3 -m emrun "$@"; return; }
    local left=$((DEADLINE - SECONDS))
    [ "$left" -gt 0 ] || { echo "DEADLINE=$DEADLINE s reached: not started" >&2; return 124; }
    timeout --signal=TERM --kill-after=45 "$left" python3 -m emrun "$@"
}

FAILED=()
step() {  # step NAME ARGS...: one benchmark, its figures kept whatever the others do
    local name=$1 start=$SECONDS rc
    shift
    echo "== $name: emrun $*"
    emrun "$@" --json > "$OUT/$name.json" 2> "$OUT/$name.log"
    rc=$?
    echo "   exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] && [ -s "$OUT/$name.json" ] || FAILED+=("$name (exit $rc)")
    tail -n 25 "$OUT/$name.log"
    cat "$OUT/$name.json"
    echo
}

preflight() {
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
    python3 - <<'EOF' || { echo "preflight failed: are all loads unpacked?"; exit 1; }
import importlib, platform, torch
missing = []
for module in ("emrun.cli", "numba", "zarr", "pydantic", "mwatershed", "cc3d", "edt",
               "matplotlib.pyplot", "sqlalchemy", "funlib.geometry", "monai", "waterz"):
    try:
        importlib.import_module(module)
    except Exception as exc:  # report every missing piece at once
        missing.append(f"{module} ({type(exc).__name__}: {exc})")
cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
print(f"python {platform.python_version()}, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, {cuda}")
if missing:
    raise SystemExit("cannot import: " + "; ".join(missing))
EOF
}

AFF=recipes/snemi3d_aff.yaml
SMALL=(-o 'model.widths=[16, 32, 64, 128]' -o infer.batch_size=16)

mode_engine() {
    step engine_9_blocks bench infer $AFF --device cuda --shape 60 2048 2048 "${SMALL[@]}"
    step engine_16_blocks bench infer $AFF --device cuda --shape 60 3072 3072 "${SMALL[@]}"
    # the hand-over's two ends: no room on the GPU, every sum waiting in host memory (the
    # copies' cost), and no room anywhere (each block its own unit: the repeats' cost)
    step engine_16_host bench infer $AFF --device cuda --shape 60 3072 3072 "${SMALL[@]}" \
        --handover-memory 0 --handover-host-memory 16GiB
    step engine_16_none bench infer $AFF --device cuda --shape 60 3072 3072 "${SMALL[@]}" \
        --handover-memory 0
    step engine_compiled bench infer $AFF --device cuda --shape 60 2048 2048 "${SMALL[@]}" \
        -o infer.compile=true
}

mode_configs() {
    step model_configs bench infer $AFF --device cuda --shape 60 2048 2048 "${SMALL[@]}" \
        --configs
    step engine_alone bench infer $AFF --device cpu --no-model --shape 60 3072 3072 \
        "${SMALL[@]}" --workers 1,2,4,8
}

mode_train() {
    step train_batch1 bench train $AFF --device cuda --steps 50
    step train_batch4 bench train $AFF --device cuda --steps 30 -o train.batch_size=4
    step train_compiled bench train $AFF --device cuda --steps 50 -o train.compile=true
    step loader_16_workers bench data $AFF --synthetic --workers 16 --samples 64
}

SNEMI_OUT=$WORK/snemi3d_${RECIPE:-snemi3d_aff}_${ITER:-3000}  # a second call resumes it

mode_snemi() {
    local data=$STATE/data/snemi3d
    if [ ! -f "$data/train-input.tif" ]; then
        echo "no SNEMI3D volumes in $data: unpack all loads"
        FAILED+=("snemi (no data)")
        return
    fi
    if [ -f "$SNEMI_OUT/results.json" ]; then  # bench snemi3d refuses a finished --out
        echo "== snemi: $SNEMI_OUT is finished already (results.json); its figures are kept"
        keep_snemi
        return
    fi
    step "snemi3d_${RECIPE:-snemi3d_aff}" bench snemi3d --data "$data" --out "$SNEMI_OUT" \
        --recipe "${RECIPE:-snemi3d_aff}" --iterations "${ITER:-3000}" --device "${DEVICE:-cuda}"
    keep_snemi
}

mode_final() {  # after snemi, in the same call or a later one: all 70 sections, packaged
    # --final takes the recipe, iterations and overrides from $SNEMI_OUT/results.json and
    # refuses --recipe, --iterations and -o: RECIPE and ITER only choose the folder here.
    if [ ! -f "$SNEMI_OUT/results.json" ]; then
        echo "no $SNEMI_OUT/results.json: run snemi first (same RECIPE and ITER)"
        FAILED+=("final (no snemi)")
        return
    fi
    step "snemi3d_final_${RECIPE:-snemi3d_aff}" bench snemi3d --final --data \
        "$STATE/data/snemi3d" --out "$SNEMI_OUT" --device "${DEVICE:-cuda}"
    keep_snemi
}

keep_snemi() {  # the figures, tables, curves and resolved recipes (not volumes or weights)
    find "$SNEMI_OUT" -maxdepth 2 -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' \
        -o -name '*.png' -o -name '*.yaml' \) ! -name zarr.json -size -4M | while read -r f; do
        cp "$f" "$OUT/snemi3d_$(echo "${f#"$SNEMI_OUT"/}" | tr / _)"
    done
}

mode_segment() {
    step segment_workers bench segment --shape 128 1024 1024 --workers 1 --workers 2 \
        --workers 4 --folder "$WORK/segment"
}

mode_quick() {  # the same commands on tiny sizes, on the CPU: catches a broken script here
    local tiny=(-o 'model.widths=[4, 8]' -o infer.batch_size=2)
    step quick_engine bench infer recipes/demo.yaml --device cpu --shape 24 96 96 "${tiny[@]}"
    step quick_host bench infer recipes/demo.yaml --device cpu --shape 24 96 96 "${tiny[@]}" \
        --block 12 48 48 --handover-memory 0 --handover-host-memory 1GiB
    step quick_configs bench infer recipes/demo.yaml --device cpu --shape 24 96 96 "${tiny[@]}" \
        --configs --repeats 2
    step quick_alone bench infer recipes/demo.yaml --device cpu --no-model --shape 24 96 96 \
        --workers 1,2
    step quick_train bench train recipes/demo.yaml --device cpu --steps 2
    step quick_loader bench data recipes/demo.yaml --synthetic --workers 1 --samples 4
    step quick_segment bench segment --shape 32 128 128 --block 16 64 64 --workers 1 \
        --workers 2 --folder "$WORK/segment"
}

[ $# -gt 0 ] || { sed -n '2,14p' "$0"; exit 2; }
for mode in "$@"; do
    declare -F "mode_$mode" >/dev/null || { echo "unknown mode: $mode"; exit 2; }
done
preflight
for mode in "$@"; do "mode_$mode"; done
ls -la "$OUT"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "failed steps: ${FAILED[*]} (their logs are in $OUT)"
    exit 1
fi
echo "all steps exited 0 with their JSON line"
