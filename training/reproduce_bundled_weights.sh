#!/usr/bin/env bash
# Train, export and evaluate the synthetic-tumor experiment and the bundled weights.
#
# The experiment trains on ircadb1.7 and chaos_ct3 (no real tumor label) and evaluates on
# the real tumors of ircadb1.17, in three modes. Mode synthetic inserts synthetic tumors
# that may be cut off at the liver edge. Mode inside keeps them inside the liver; it trains
# the U-Net only and reuses the classifier of mode synthetic. Mode plain inserts none.
# The bundled weights (mode bundled) then train on all three cases with the inside recipe
# and have no held-out case. Mode classifier_sizes compares the classifier's input size
# and width on the same held-out split. It trains one classifier on 192 x 192 pixels of
# 2 mm and one twice as wide on 128 x 128 pixels of 3 mm. Each is evaluated next to the
# U-Net of mode inside, so run modes synthetic and inside first. Run from the repository
# root with the [train] extra installed. On a 2-core CPU each U-Net run took 13 to 20
# minutes, longer when shared, and each classifier run 3 to 7 minutes.
#
# Usage: training/reproduce_bundled_weights.sh [synthetic|inside|plain|bundled|classifier_sizes|all]
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=../shared/data/train
VALIDATION=ircadb1.17
COMMON=(--data-dir "$DATA" --epochs 1000 --num-workers 1 --seed 0)
HELD_OUT=(--val-cases "$VALIDATION" --val-every-n-epochs 5)
ALL_CASES=(--val-fraction 0)
SEGMENTER=(--task segmentation --features 16 32 64 128 256 --max-steps 1000
           --time-limit-min 30 --batch-size 16)
CLASSIFIER=(--task classification --max-steps 600 --time-limit-min 15 --batch-size 32)

train_pair() {  # $1: run name, then extra train.py options
    local name=$1
    shift
    python training/train.py "${SEGMENTER[@]}" "${COMMON[@]}" --output-dir "runs/seg_$name" "$@"
    python training/train.py "${CLASSIFIER[@]}" "${COMMON[@]}" --output-dir "runs/cls_$name" "$@"
}

export_pair() {  # $1: run name, $2: weights folder, $3: checkpoint name pattern, then export.py options
    local name=$1 weights=$2 pattern=$3
    shift 3
    for task in seg cls; do
        local checkpoint
        checkpoint=$(ls -t "runs/${task}_$name"/checkpoints/$pattern | head -n 1)
        python training/export.py --checkpoint "$checkpoint" --output-dir "$weights" "$@" \
            --note "licence=non-commercial research use only (training data CC BY-NC-ND / CC BY-NC-SA)"
    done
}

evaluate() {  # $1: run name, $2: weights folder, then the case ids
    local name=$1 weights=$2
    shift 2
    python training/evaluate.py --data-dir "$DATA" --cases "$@" --weights "$weights" \
        --output-dir "runs/eval_$name" --device cpu
}

mode=${1:-all}
if [[ $mode == synthetic || $mode == all ]]; then
    train_pair synth "${HELD_OUT[@]}" --synthetic-tumors 0.5
    export_pair synth runs/weights_synth 'best-*.ckpt'
    evaluate synth runs/weights_synth "$VALIDATION"
fi
if [[ $mode == inside || $mode == all ]]; then
    python training/train.py "${SEGMENTER[@]}" "${COMMON[@]}" "${HELD_OUT[@]}" \
        --synthetic-tumors 0.5 --synthetic-max-outside-fraction 0 --output-dir runs/seg_inside
    mkdir -p runs/weights_inside
    cp runs/weights_synth/slice_classifier_vgg16bn.safetensors runs/weights_synth/manifest.json \
        runs/weights_inside/
    python training/export.py --output-dir runs/weights_inside \
        --checkpoint "$(ls -t runs/seg_inside/checkpoints/best-*.ckpt | head -n 1)"
    evaluate inside runs/weights_inside "$VALIDATION"
fi
if [[ $mode == plain || $mode == all ]]; then
    train_pair plain "${HELD_OUT[@]}"
    export_pair plain runs/weights_plain 'best-*.ckpt'
    evaluate plain runs/weights_plain "$VALIDATION"
fi
if [[ $mode == classifier_sizes || $mode == all ]]; then
    for variant in "s192 --spacing-mm 2.0 --image-size 192" "w2 --width-divisor 2"; do
        read -r name options <<< "$variant"
        # shellcheck disable=SC2086  # the options are meant to split into words
        python training/train.py "${CLASSIFIER[@]}" "${COMMON[@]}" "${HELD_OUT[@]}" \
            --synthetic-tumors 0.5 --output-dir "runs/cls_$name" $options
        rm -rf "runs/weights_$name"
        mkdir -p "runs/weights_$name"
        cp runs/weights_inside/* "runs/weights_$name/"
        python training/export.py --output-dir "runs/weights_$name" \
            --checkpoint "$(ls -t "runs/cls_$name"/checkpoints/best-*.ckpt | head -n 1)"
        evaluate "$name" "runs/weights_$name" "$VALIDATION"
    done
fi
if [[ $mode == bundled || $mode == all ]]; then
    # No validation case: the last checkpoint is exported. The evaluation runs on the
    # training cases, so it measures fit, not accuracy on unseen CT.
    train_pair all "${ALL_CASES[@]}" --synthetic-tumors 0.5 --synthetic-max-outside-fraction 0
    export_pair all LiverTumorAI/Resources/Weights last.ckpt --version 0.2.0
    evaluate bundled_training_fit LiverTumorAI/Resources/Weights ircadb1.7 chaos_ct3 "$VALIDATION"
fi
