#!/usr/bin/env bash
# Super-resolution's fidelity module (docs/training.md, docs/results.md "Super-resolution fidelity"), 2026-12-06:
# trained on the served super-resolution entry's own outputs, installed beside it, measured with cdd-eval on the
# held-out photographs (both degradations) and the held-out scenes at three noise seeds, and through cdd-serve on
# held-out photographs at the sizes people send (benchmarks/sr_photos.py).
#
#     bash experiments/sr_fidelity.sh [train|eval|serve|autoencoder]...
#
#   RUNS   where runs and tables go (runs/fidelity)
#   SEEDS  noise seeds ("0 1000 2000")
#   FW     the fidelity weights measured ("0,0.5,1")
set -euo pipefail
RUNS=${RUNS:-runs/fidelity}
SEEDS=${SEEDS:-"0 1000 2000"}
FW=${FW:-0,0.5,1}
SR=adapters/embedded/zoo/super-resolution
for what in "$@"; do
  case "$what" in
    train)
      cdd-train-fidelity --entry "$SR" --output "$RUNS/v1" --pool-size 4096 --max-train-steps 1500 \
        --checkpoint-every 100 --resume --install "$RUNS/entry" --fidelity-default 1 ;;
    eval)
      for s in $SEEDS; do
        steps=4; [[ $s == 0 ]] && steps=1,2,4
        for d in photos:mild-64px photos:bicubic scenes:mild-64px; do
          cdd-eval --task super-resolution --dataset "${d%%:*}" --degradation "${d#*:}" --prompt none --num-images 64 \
            --batch-size 32 --seed "$s" --bicubic --adapters "sr=$RUNS/entry" --fidelity "$FW" --steps "$steps" \
            --out "$RUNS/eval/${d%%:*}-${d#*:}/seed$s"
        done
      done ;;
    serve)  # the embedded zoo, once experiments/install_sr_fidelity.py has installed the entry
      for d in bicubic mild-64px; do
        python benchmarks/sr_photos.py --fidelity 0,1 --crops64 4 --crops128 1 --whole --seeds 0 --degradations "$d" \
          --out "$RUNS/serve-$d"
      done ;;
    autoencoder)
      python experiments/autoencoder_quality.py --vae adapters/embedded/backbone/vae --n 256 --out "$RUNS/autoencoder" \
        --fidelity "$RUNS/entry" ;;
    *) echo "unknown step $what" >&2; exit 2 ;;
  esac
done
