#!/usr/bin/env bash
# Guidance-aware CoDi (docs/training.md, docs/results.md "Guidance-aware CoDi"), 2026-12-06: the depth student trained
# with the guided teacher against plain CoDi at the same budget (both continued 1500 steps from the served depth
# entry), the edit student against the served edit entry (both 2000 steps from the edit teacher), measured at
# three noise seeds on the held-out scenes, with the caption and with the empty prompt.
#
# The second depth run (2026-12-06, later) changes one thing against the first guided run: the guided teacher's
# unconditional branch is the backbone alone with "" (--guidance-unconditional text+condition), not the entry with
# the map and "". The third (-ifempty) does so only for the samples whose caption was dropped.
#
#     bash experiments/guided_codi.sh [train-depth|train-depth-both|train-depth-ifempty|train-edit|eval-depth|eval-edit]...
#
#   RUNS   where runs and tables go (runs/guided)
#   SEEDS  noise seeds ("0 1000 2000")
#   W      the w of the guided rows with the caption ("0,1,2,3")
#   W0     the w of the guided rows with the empty prompt ("1")
#   SEEDS0 the noise seeds of the empty-prompt rows ("0")
#   ADAPTERS  the entries to measure, NAME=FOLDER,... (default: the task's entries below)
#   EVAL   where the cdd-eval folders go ("$RUNS/eval")
set -euo pipefail
RUNS=${RUNS:-runs/guided}
SEEDS=${SEEDS:-"0 1000 2000"}
W=${W:-0,1,2,3}
W0=${W0:-1}
SEEDS0=${SEEDS0:-0}
EVAL=${EVAL:-$RUNS/eval}
C="--ema 0.99 --lr 3e-4 --batch-size 4 --checkpoint-every 100 --keep-checkpoints 2 --num-workers 1 --sample-every 0 --resume"
DEPTH="--task depth --method codi --init-from adapters/embedded/zoo/depth --caption-dropout 0.5 --max-train-steps 1500 $C"
EDIT="--task edit --method codi --caption-dropout 0.1 --max-train-steps 2000 $C"
for what in "$@"; do
  case "$what" in
    train-depth)
      cdd-train-adapter $DEPTH --adapter controlnet-guided --guidance-min 0 --guidance-max 3 --guidance 1 --output "$RUNS/depth-gcodi2"
      cdd-train-adapter $DEPTH --adapter controlnet --output "$RUNS/depth-codi-ctl" ;;
    train-depth-both)
      cdd-train-adapter $DEPTH --adapter controlnet-guided --guidance-min 0 --guidance-max 3 --guidance 1 \
        --guidance-unconditional text+condition --output "$RUNS/depth-gcodi-both" ;;
    train-depth-ifempty)  # the backbone alone as the unconditional branch only where the caption was dropped
      cdd-train-adapter $DEPTH --adapter controlnet-guided --guidance-min 0 --guidance-max 3 --guidance 1 \
        --guidance-unconditional text+condition-if-empty --output "$RUNS/depth-gcodi-ifempty" ;;
    train-edit)  # the control is the served edit entry: plain CoDi, 2000 steps from the same teacher
      cdd-train-adapter $EDIT --adapter controlnet-guided --init-from docs/results/zoo-v2/entries/edit-teacher-xxl \
        --guidance-min 0 --guidance-max 3 --guidance 1 --output "$RUNS/edit-gcodi2" ;;
    eval-depth|eval-edit)
      task=${what#eval-}
      A=${ADAPTERS:-}
      if [[ -n $A ]]; then :
      elif [[ $task == depth ]]; then
        A="served=adapters/embedded/zoo/depth,codi-1500=$RUNS/depth-codi-ctl/entry,guided=$RUNS/depth-gcodi2/entry"
        if [[ -d $RUNS/depth-gcodi-both/entry ]]; then A="$A,guided-both=$RUNS/depth-gcodi-both/entry"; fi
      else
        A="served=adapters/embedded/zoo/edit,guided=$RUNS/edit-gcodi2/entry"
      fi
      for s in $SEEDS; do
        cdd-eval --task "$task" --num-images 64 --batch-size 32 --seed "$s" --prompt caption --adapters "$A" \
          --guidance "$W" --steps 1,2,4 --out "$EVAL/$task-caption/seed$s"
      done
      for s in $SEEDS0; do
        cdd-eval --task "$task" --num-images 64 --batch-size 32 --seed "$s" --prompt none --adapters "$A" \
          --guidance "$W0" --steps 4 --out "$EVAL/$task-none/seed$s"
      done ;;
    *) echo "unknown: $what" >&2; exit 2 ;;
  esac
done
