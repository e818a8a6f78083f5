#!/usr/bin/env bash
# The GPU protocol (issue 11): everything that needs CUDA, in one go. Results (JSON) and logs go under
# benchmarks/results/gpu/ (or $OUT); commit them with the README's GPU table.
#
#   bash benchmarks/gpu.sh            # all steps (about an hour on one GPU: the compiled speed runs dominate)
#   STEPS="tests speed" bash benchmarks/gpu.sh   # some of: tests speed train nccl hf
#
# A short device budget (e.g. 10 minutes a command) does not hold the whole protocol: run the steps one at a time,
# cheapest first (STEPS=train, STEPS=hf, STEPS=tests, then speed), each with its own OUT/ results committed.
#
# Steps:
#   tests  the test suite on the GPU (tests parametrised over devices run their CUDA cases) -> tests.json
#   speed  benchmarks/speed.py, batch 256, fp32 and fp16 autocast, eager and torch.compile: DeiT-T, DeiT-S unpatched,
#          DeiT-S with each method at keep 0.7 and at the 35% GMACs budget -> speed_{fp32,fp16}_{eager,compiled}.json
#   train  one `tpsvit train` step (dTPS fine-tune of the shipped mini-DeiT on synthetic Fashion-MNIST files) with
#          bf16 and with fp16 autocast (GradScaler) on cuda -> train_{bf16,fp16}.json
#   nccl   if two GPUs exist: the same step under `torchrun --nproc_per_node 2` (DDP over NCCL) -> nccl.json
#   hf     benchmarks/hf_speed.py on cuda with fp16 autocast: HF ViT-B/16 vs timm DeiT-B, unpatched / etps 0.7 / ToMe
#          at the same GMACs, batch 1, 16 and 64 -> hf_speed.json
# Every step runs even if an earlier one fails; summary.json lists each step's command, exit code and seconds, and
# the script exits non-zero when any step failed. Without a CUDA GPU it stops at once with a clear message (exit 3).
set -uo pipefail
here=${BASH_SOURCE[0]%/*}
[ "$here" = "${BASH_SOURCE[0]}" ] && here=.
cd "$here/.." || exit 1
PY=${PYTHON:-python3}

# ---------------------------------------------------------------------------------------------------- the CUDA gate
if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu.sh: no NVIDIA GPU here (nvidia-smi not found); run this script on a machine with a CUDA GPU" >&2
    exit 3
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: nvidia-smi exists but torch.cuda.is_available() is False ($("$PY" -c 'import torch; print("torch", torch.__version__, "built for CUDA", torch.version.cuda)' 2>&1)); install a CUDA build of torch or check the driver" >&2
    exit 3
fi

OUT=${OUT:-benchmarks/results/gpu}
STEPS=${STEPS:-tests speed train nccl hf}
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SUMMARY="$WORK/summary.tsv"
: > "$SUMMARY"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "gpu.sh: $GPUS GPU(s): $("$PY" -c "import torch; print(torch.cuda.get_device_name(0))"); results in $OUT"

# step NAME COMMAND...: run it, log to $OUT/NAME.log, record exit code and seconds
step() {
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$*" >> "$SUMMARY"
    tail -n 3 "$OUT/$name.log"
    [ "$rc" = 0 ] || echo "   -> $name failed (exit $rc); see $OUT/$name.log"
}
wants() { [[ " $STEPS " == *" $1 "* ]]; }

# ------------------------------------------------------------------------------------------------------ the steps
if wants tests; then
    step tests "$PY" -m pytest -q -rs --junitxml="$WORK/tests.xml"
    "$PY" - "$WORK/tests.xml" "$OUT/tests.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
cases = []
for case in suite.iter("testcase"):
    status = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
    cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "status": status,
                  "seconds": float(case.get("time", 0))})
counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failure", "error", "skipped")}
cuda = [c for c in cases if "cuda" in c["test"]]
json.dump({"counts": counts, "cuda_cases": {s: sum(c["status"] == s for c in cuda) for s in counts},
           "cases": cases}, open(sys.argv[2], "w"), indent=1)
print("tests:", counts, "| cuda cases:", {s: sum(c["status"] == s for c in cuda) for s in counts})
EOF
fi

if wants speed; then
    for amp in fp32 fp16; do
        for mode in eager compiled; do
            args=(--device cuda --batch-sizes 256 --keep-rates 0.7 --budget 0.35
                  --budget-methods etps dtps evit dynamicvit tome --runs 10 --repeats 3 --warmup 3)
            [ "$amp" = fp16 ] && args+=(--amp fp16)
            [ "$mode" = compiled ] && args+=(--compile)
            step "speed_${amp}_${mode}" "$PY" benchmarks/speed.py "${args[@]}" --json "$OUT/speed_${amp}_${mode}.json"
        done
    done
fi

if wants train || wants nccl; then
    DATA="$WORK/fmnist"
    "$PY" -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; from fmnist_files import write_fashion_mnist; write_fashion_mnist(Path(sys.argv[1]), n_train=256, n_test=64)" "$DATA"
    TRAIN=(--recipe fmnist-finetune --checkpoint src/tpsvit/assets/mini_deit_fmnist.safetensors --data "$DATA"
           --method dtps --keep-rate 0.7 --epochs 1 --steps 1 --limit 256 --val-limit 64 --batch-size 64
           --eval-every 1)
fi
if wants train; then
    for amp in bf16 fp16; do
        step "train_$amp" "$PY" -m tpsvit.cli train "${TRAIN[@]}" --device cuda --amp "$amp" --out "$WORK/train_$amp"
        [ -f "$WORK/train_$amp/metrics.json" ] && cp "$WORK/train_$amp/metrics.json" "$OUT/train_$amp.json"
    done
fi
if wants nccl; then
    if [ "$GPUS" -ge 2 ]; then
        step nccl "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m tpsvit.cli train "${TRAIN[@]}" \
            --amp bf16 --out "$WORK/nccl"
        [ -f "$WORK/nccl/metrics.json" ] && cp "$WORK/nccl/metrics.json" "$OUT/nccl.json"
    else
        echo "== nccl: skipped (one GPU; the two-process NCCL run needs two)"
        printf 'nccl\tskipped\t0\tneeds two GPUs, found %s\n' "$GPUS" >> "$SUMMARY"
    fi
fi

if wants hf; then
    step hf_speed "$PY" benchmarks/hf_speed.py --device cuda --amp fp16 --batch-sizes 1 16 64 --runs 20 --repeats 5 \
        --warmup 5 --json "$OUT/hf_speed.json"
fi

# --------------------------------------------------------------------------------------------------- the summary
"$PY" - "$SUMMARY" "$OUT/summary.json" <<'EOF'
import json, platform, sys, torch
steps = []
for line in open(sys.argv[1]):
    name, rc, seconds, command = line.rstrip("\n").split("\t", 3)
    steps.append({"step": name, "exit_code": rc if rc == "skipped" else int(rc), "seconds": int(seconds),
                  "command": command})
env = {"gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
       "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
json.dump({"environment": env, "steps": steps}, open(sys.argv[2], "w"), indent=1)
failed = [s["step"] for s in steps if s["exit_code"] not in (0, "skipped")]
print(f"summary: {len(steps)} steps, failed: {', '.join(failed) or 'none'}; saved {sys.argv[2]}")
sys.exit(1 if failed else 0)
EOF
