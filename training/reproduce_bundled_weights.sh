#!/usr/bin/env bash
# Train, export and evaluate the bundled weights and the synthetic-tumor comparison.
#
# Both models train on ircadb1.7 and chaos_ct3 (no real tumor label) and are validated on
# ircadb1.17 (two real tumors). The bundled weights use synthetic tumors; the comparison
# row trains the same way without them. Run from the repository root with the [train]
# extra installed; on a 2-core CPU each U-Net run takes about 15 to 30 minutes.
#
# Usage: training/reproduce_bundled_weights.sh [synthetic|plain|all]
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=../shared/data/train
VALIDATION=ircadb1.17
COMMON=(--data-dir "$DATA" --val-cases "$VALIDATION" --epochs 1000 --num-workers 1
        --val-every-n-epochs 5 --seed 0)
SEGMENTER=(--task segmentation --features 16 32 64 128 256 --max-steps 1000
           --time-limit-min 30 --batch-size 16)
CLASSIFIER=(--task classification --max-steps 600 --time-limit-min 15 --batch-size 32)

train_pair() {  # $1: run name, then extra train.py options
    local name=$1
    shift
    python training/train.py "${SEGMENTER[@]}" "${COMMON[@]}" --output-dir "runs/seg_$name" "$@"
    python training/train.py "${CLASSIFIER[@]}" "${COMMON[@]}" --output-dir "runs/cls_$name" "$@"
}

export_and_evaluate() {  # $1: run name, $2: weights folder
    local name=$1 weights=$2
    for task in seg cls; do
        local best
        best=$(ls -t "runs/${task}_$name"/checkpoints/best-*.ckpt | head -n 1)
        python training/export.py --checkpoint "$best" --output-dir "$weights" \
            --note "licence=non-commercial research use only (training data CC BY-NC-ND / CC BY-NC-SA)"
    done
    python training/evaluate.py --data-dir "$DATA" --cases "$VALIDATION" --weights "$weights" \
        --output-dir "runs/eval_$name" --device cpu
}

mode=${1:-all}
if [[ $mode == synthetic || $mode == all ]]; then
    train_pair synth --synthetic-tumors 0.5
    export_and_evaluate synth LiverTumorAI/Resources/Weights
fi
if [[ $mode == plain || $mode == all ]]; then
    train_pair plain
    export_and_evaluate plain runs/weights_plain
fi
