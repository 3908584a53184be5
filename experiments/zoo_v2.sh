#!/usr/bin/env bash
# Experiment script. Produced the latent zoo's runs, Table 1 (docs/results/super-resolution) and the tables
# under docs/results/zoo-v2 (docs/results.md, docs/history.md); `zoo` installs adapters/embedded/zoo.
# Rebuild the default zoo on the latent backbone (issue 16): the teachers, the CoDi students, the baselines
# distilled from the same teacher at the same budget, Table 1 over three noise seeds, and the zoo itself.
#
#     bash experiments/zoo_v2.sh [train [RUN...]|eval|zoo|all]     (default all)
#
# `train sr-finetune depth-finetune` runs only those (two streams can share a machine); the run names are
# in ALL_RUNS below.
#
# Every training command passes --resume, so running the script again continues where it stopped (a run
# that has finished its --max-train-steps only rewrites its entry). Budgets come from the environment:
#
#   BACKBONE        the backbone folder              (adapters/embedded/backbone)
#   RUNS            where runs and tables go          (runs/zoo-v2)
#   TEACHER_STEPS   fine-tuned teachers               (3000)
#   STUDENT_STEPS   each distilled student (CoDi, CM; GD's three rounds share it)   (3000)
#   N_IMAGES        held-out images per eval row      (64)
#   SEEDS           noise seeds of Table 1            ("0 1000 2000")
#   SR_CODI         the CoDi super-resolution entry the tables measure  ($RUNS/sr-codi/entry; the installed
#                   adapters/embedded/zoo/super-resolution is the same run, float16, as served)
#   TABLES          the tables `eval` measures  ("super-resolution-scenes super-resolution-photos depth edit")
#   SMOKE=1         2 steps everywhere, 2 images, one seed: checks the whole pipeline in minutes
#
# The super-resolution adapters train on scenes and the backbone's photo patches (held-out photos never
# seen), with the mild-64px degradation and the prompt dropped half of the time, and are measured as a user
# sends the request: no prompt. Long on a CPU: the budgets above are sized for a GPU or many hours of CPU.
set -euo pipefail

BACKBONE=${BACKBONE:-adapters/embedded/backbone}
RUNS=${RUNS:-runs/zoo-v2}
TEACHER_STEPS=${TEACHER_STEPS:-3000}
STUDENT_STEPS=${STUDENT_STEPS:-3000}
N_IMAGES=${N_IMAGES:-64}
SEEDS=${SEEDS:-"0 1000 2000"}
if [[ "${SMOKE:-0}" == 1 ]]; then
  TEACHER_STEPS=2 STUDENT_STEPS=3 N_IMAGES=2 SEEDS=0
fi
GD_ROUND=$(( STUDENT_STEPS / 3 > 0 ? STUDENT_STEPS / 3 : 1 ))
TEACHER_LADDER=${TEACHER_LADDER:-4,8,16,50,200}
[[ "${SMOKE:-0}" == 1 ]] && TEACHER_LADDER=4,8

C="--backbone $BACKBONE --lr 3e-4 --checkpoint-every 100 --keep-checkpoints 2 --num-workers 1 --sample-every 0 --resume"
SR="--task super-resolution --caption-dropout 0.5 --photo-fraction 0.5 --degradation mild-64px"
T="$RUNS/sr-finetune/entry"
SR_CODI=${SR_CODI:-$RUNS/sr-codi/entry}

train() {
  echo "== cdd-train-adapter $*"
  cdd-train-adapter "$@"
}

# one named run each; `train NAME...` runs those in order, `train` all of them (teachers first)
run_one() {
  case "$1" in
    # the teachers (GD's unconditional branch runs the SR teacher on the empty prompt: caption dropout 0.5 covers it)
    sr-finetune) train $SR --method finetune --max-train-steps "$TEACHER_STEPS" $C --output "$RUNS/sr-finetune" ;;
    depth-finetune) train --task depth --method finetune --caption-dropout 0.1 --max-train-steps "$TEACHER_STEPS" $C \
      --output "$RUNS/depth-finetune" ;;
    edit-finetune) train --task edit --method finetune --caption-dropout 0.1 --max-train-steps "$TEACHER_STEPS" $C \
      --output "$RUNS/edit-finetune" ;;
    # CoDi, finetune-first (the student starts as its teacher), modes pe and lora
    sr-codi) train $SR --method codi --init-from "$T" --ema 0.99 --max-train-steps "$STUDENT_STEPS" $C --output "$RUNS/sr-codi" ;;
    sr-codi-lora) train $SR --method codi --mode lora --init-from "$T" --ema 0.99 --max-train-steps "$STUDENT_STEPS" $C \
      --output "$RUNS/sr-codi-lora" ;;
    # the depth teacher after TEACHER_STEPS at caption dropout 0.1 drew what the caption says wherever the backbone
    # puts it (its edges matched its own map no better than other maps): continued with the caption dropped half of
    # the time, so that the map is what places the objects
    depth-finetune-2) train --task depth --method finetune --caption-dropout 0.5 --init-from "$RUNS/depth-finetune/entry" \
      --max-train-steps "$TEACHER_STEPS" $C --output "$RUNS/$1" ;;
    depth-codi) train --task depth --method codi --caption-dropout 0.5 --init-from "$RUNS/depth-finetune-2/entry" --ema 0.99 \
        --max-train-steps "$STUDENT_STEPS" $C --output "$RUNS/$1" ;;
    edit-codi) train --task edit --method codi --caption-dropout 0.1 --init-from "$RUNS/edit-finetune/entry" --ema 0.99 \
        --max-train-steps "$STUDENT_STEPS" $C --output "$RUNS/$1" ;;
    # the edit teacher (3000 steps at caption dropout 0.1 from a fresh adapter) changed what it was asked but redrew
    # the objects around it (their colours and shapes): the same recipe started from the SR teacher, an adapter that
    # already reproduces its input image (transfer), and its CoDi student
    edit-finetune-sr) train --task edit --method finetune --caption-dropout 0.1 --init-from "$T" --max-train-steps "$TEACHER_STEPS" $C \
      --output "$RUNS/$1" ;;
    edit-codi-sr) train --task edit --method codi --caption-dropout 0.1 --init-from "$RUNS/edit-finetune-sr/entry" --ema 0.99 \
        --max-train-steps "$STUDENT_STEPS" $C --output "$RUNS/$1" ;;
    # the edit teacher four times as long (12k steps, badb535): the transfer teacher continued for 3 x TEACHER_STEPS more,
    # plainly (-long) or with the loss weighted toward the region each edit changes (-long-w: an object's colour or
    # a removal changes 7-8% of the picture, so the plain loss hardly asks for it), and their CoDi students
    edit-finetune-sr-long) train --task edit --method finetune --caption-dropout 0.1 --init-from "$RUNS/edit-finetune-sr/entry" \
        --max-train-steps $(( 3 * TEACHER_STEPS )) $C --output "$RUNS/$1" ;;
    edit-finetune-sr-long-w) train --task edit --method finetune --caption-dropout 0.1 --init-from "$RUNS/edit-finetune-sr/entry" \
        --changed-weight 9 --max-train-steps $(( 3 * TEACHER_STEPS )) $C --output "$RUNS/$1" ;;
    edit-finetune-sr-long-w3) train --task edit --method finetune --caption-dropout 0.1 --init-from "$RUNS/edit-finetune-sr/entry" \
        --changed-weight 3 --max-train-steps $(( 3 * TEACHER_STEPS )) $C --output "$RUNS/$1" ;;
    # the plain teacher continued for 16k more steps (28k in all, 2.3 times the 12k; 262a6cd), for the slope of
    # the per-kind PSNR against budget, and its student (the run was started for 24k and stopped at 16k for time)
    edit-finetune-sr-xl) train --task edit --method finetune --caption-dropout 0.1 --init-from "$RUNS/edit-finetune-sr-long/entry" \
        --max-train-steps $(( 16 * TEACHER_STEPS / 3 )) $C --output "$RUNS/$1" ;;
    # ... continued again (stopped for time at a checkpoint, 11,500 steps, exported with --max-train-steps at that
    # step; then continued with --resume to XXL_STEPS=23500, 3e97efa), and its student.
    # EDIT_TEACHER picks the teacher a student starts from (the 11,500-step export was distilled too, kept
    # as edit-finetune-sr-xxl-39k, into edit-codi-sr-xxl-39k)
    edit-finetune-sr-xxl) train --task edit --method finetune --caption-dropout 0.1 --init-from "$RUNS/edit-finetune-sr-xl/entry" \
        --max-train-steps "${XXL_STEPS:-$(( 16 * TEACHER_STEPS / 3 ))}" $C --output "$RUNS/$1" ;;
    edit-codi-sr-xxl*) train --task edit --method codi --caption-dropout 0.1 --init-from "${EDIT_TEACHER:-$RUNS/edit-finetune-sr-xxl/entry}" \
        --ema 0.99 --max-train-steps "$STUDENT_STEPS" $C --output "$RUNS/$1" ;;
    # ... and the same 64k images in batches of 16 (a quarter of the steps): at batch 4 a step sees about one
    # colour edit and one removal
    edit-finetune-sr-b16) train --task edit --method finetune --caption-dropout 0.1 --init-from "$RUNS/edit-finetune-sr-long/entry" \
        --batch-size 16 --max-train-steps $(( 4 * TEACHER_STEPS / 3 )) $C --output "$RUNS/$1" ;;
    edit-codi-sr-long|edit-codi-sr-long-w|edit-codi-sr-xl) train --task edit --method codi --caption-dropout 0.1 \
        --init-from "$RUNS/${1/codi/finetune}/entry" --ema 0.99 --max-train-steps "$STUDENT_STEPS" $C --output "$RUNS/$1" ;;
    # ... and students that keep the weighting in CoDi's guidance term: from the w = 9 teacher (-ww), from w = 3 (-w3)
    edit-codi-sr-long-ww) train --task edit --method codi --caption-dropout 0.1 --init-from "$RUNS/edit-finetune-sr-long-w/entry" \
        --changed-weight 9 --ema 0.99 --max-train-steps "$STUDENT_STEPS" $C --output "$RUNS/$1" ;;
    edit-codi-sr-long-w3) train --task edit --method codi --caption-dropout 0.1 --init-from "$RUNS/edit-finetune-sr-long-w3/entry" \
        --changed-weight 3 --ema 0.99 --max-train-steps "$STUDENT_STEPS" $C --output "$RUNS/$1" ;;
    # the other super-resolution architectures (no teacher of their own architecture: CoDi from the backbone)
    sr-t2i-codi) train $SR --adapter t2i --method codi --ema 0.99 --max-train-steps "$STUDENT_STEPS" $C --output "$RUNS/$1" ;;
    sr-controlnet-lora-codi) train $SR --adapter controlnet-lora --method codi --ema 0.99 --max-train-steps "$STUDENT_STEPS" $C \
      --output "$RUNS/$1" ;;
    # the baselines from the same teacher at the same budget: consistency distillation, and Guided Distillation's
    # three rounds (guided student at 8 steps, then 8 -> 4 ... as two progressive rounds) sharing STUDENT_STEPS
    sr-cm) train $SR --method cm --init-from "$T" --ema 0.99 --max-train-steps "$STUDENT_STEPS" $C --output "$RUNS/sr-cm" ;;
    sr-gd) train $SR --method gd --init-from "$T" --gd-steps 8 --ema 0.99 --max-train-steps "$GD_ROUND" $C --output "$RUNS/sr-gd1"
      train $SR --method gd --gd-stage 2 --gd-steps 8 --init-from "$RUNS/sr-gd1/entry" --ema 0.99 --max-train-steps "$GD_ROUND" $C \
        --output "$RUNS/sr-gd2-8"
      train $SR --method gd --gd-stage 2 --gd-steps 4 --init-from "$RUNS/sr-gd2-8/entry" --ema 0.99 --max-train-steps "$GD_ROUND" $C \
        --output "$RUNS/sr-gd2-4" ;;
    *) echo "unknown run '$1'; the runs: $ALL_RUNS" >&2; exit 2 ;;
  esac
}
ALL_RUNS="sr-finetune depth-finetune depth-finetune-2 edit-finetune sr-codi sr-codi-lora depth-codi edit-codi sr-t2i-codi sr-controlnet-lora-codi sr-cm sr-gd edit-finetune-sr edit-codi-sr edit-finetune-sr-long edit-codi-sr-long"

train_all() {
  local name
  for name in ${@:-$ALL_RUNS}; do run_one "$name"; done
}

# rows OUT "LABEL=ENTRY,..." SAMPLERS STEPS [cdd-eval options...]: measure those rows into OUT/results.json (merged:
# rerunning continues a table). An entry not trained yet is skipped with a note; a row already in the table is not
# measured again (delete the table to remeasure after retraining).
rows() {
  local out=$1 adapters=$2 samplers=$3 steps=$4 keep=() item
  shift 4
  for item in ${adapters//,/ }; do
    if [[ ! -f "${item#*=}/manifest.json" ]]; then echo "-- skipped ${item%%=*}: ${item#*=} is not trained yet"; continue; fi
    if python - "$out/results.json" "${item%%=*}" "$samplers" "$steps" <<'PY'; then continue; fi
import json, sys
from pathlib import Path
table, label, samplers, steps = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(",")
have = {(r["method"], r["sampler"], str(r["steps"])) for r in json.loads(table.read_text())["rows"]} if table.is_file() else set()
sys.exit(0 if all((label, a, k) in have for a in samplers for k in steps) else 1)
PY
    keep+=("$item")
  done
  if (( ${#keep[@]} )); then
    local IFS=,
    cdd-eval --append --out "$out" --adapters "${keep[*]}" --samplers "$samplers" --steps "$steps" "$@"
  fi
}

TABLES=${TABLES:-"super-resolution-scenes super-resolution-photos depth edit"}
wanted() { [[ " $TABLES " == *" $1 "* ]]; }

eval_all() {
  local out="$RUNS/results" s data task teacher
  for s in $SEEDS; do
    for data in scenes photos; do
      wanted "super-resolution-$data" || continue
      local o="$out/super-resolution-$data/seed$s"
      local E=(--task super-resolution --backbone "$BACKBONE" --degradation mild-64px --dataset "$data" --prompt none
               --num-images "$N_IMAGES" --batch-size 32 --seed "$s")
      [[ -f $o/results.json ]] || cdd-eval "${E[@]}" --out "$o" --bicubic --resolution 64
      rows "$o" "codi=$SR_CODI,codi-lora=$RUNS/sr-codi-lora/entry" prev,prev+ilvr 1,2,4 "${E[@]}"
      rows "$o" "finetune=$T" ddim "$TEACHER_LADDER" "${E[@]}"
      rows "$o" "finetune=$T" dpm-solver++ 4,20 "${E[@]}"
      rows "$o" "finetune=$T" prev,prev+ilvr 4 "${E[@]}"
      rows "$o" "cm=$RUNS/sr-cm/entry" cm 4 "${E[@]}"
      # GD as its last round was trained (deterministic DDIM steps: its manifest sampler), and with the paper's
      # stochastic sampler
      rows "$o" "gd=$RUNS/sr-gd2-4/entry" ddim,gd 4 "${E[@]}"
      rows "$o" "codi-t2i=$RUNS/sr-t2i-codi/entry,codi-controlnet-lora=$RUNS/sr-controlnet-lora-codi/entry" prev,prev+ilvr 4 "${E[@]}"
    done
    for task in depth edit; do
      wanted "$task" || continue
      local student o="$out/$task/seed$s" D=(--task "$task" --backbone "$BACKBONE" --num-images "$N_IMAGES" --batch-size 32 --seed "$s")
      teacher=$RUNS/$task-finetune/entry student=$RUNS/$task-codi/entry
      if [[ $task == edit ]]; then  # the edit entry of badb535: the teacher from the SR teacher, four times
        teacher=$RUNS/edit-finetune-sr-long/entry student=$RUNS/edit-codi-sr-long/entry  # as long
      fi
      if [[ $task == depth ]]; then
        teacher=$RUNS/depth-finetune-2/entry
        [[ -f $o/results.json ]] || cdd-eval "${D[@]}" --out "$o" --text-only --resolution 64 --samplers ddim --steps 50
      fi
      rows "$o" "codi=$student" prev 1,2,4 "${D[@]}"
      rows "$o" "finetune=$teacher" ddim 4,50 "${D[@]}"
    done
  done
  local -A metrics=([super-resolution-scenes]=kid_attr,fid_attr,swd,psnr,ssim,attr_all
                    [super-resolution-photos]=swd,psnr,ssim
                    [depth]=kid_attr,fid_attr,swd,depth_edge_corr,depth_edge_other,depth_edge_match
                    [edit]=kid_attr,fid_attr,swd,psnr_in,psnr_out)
  for table in "${!metrics[@]}"; do
    wanted "$table" || continue
    dirs=()
    for s in $SEEDS; do dirs+=("$out/$table/seed$s"); done
    python experiments/seed_table.py "${dirs[@]}" --metrics "${metrics[$table]}" --out "$out/$table/seeds.md"
  done
}

# Super-resolution is served with ILVR by default (SR_DEFAULTS): on held-out photographs, what users send, the
# plain sampler shifts colours (a latent decode's round trip) and lands 4 dB under bicubic; with ILVR it is
# within 0.3 dB of bicubic at a better SWD (docs/results.md). On scenes the plain sampler is the better one:
# a request can still ask for sampler=prev.
build_zoo() {
  local out="$RUNS/results" s0
  s0=$(echo "$SEEDS" | awk '{print $1}')
  python experiments/build_default_zoo.py --zoo "${ZOO:-$RUNS/zoo}" \
    --entry "super-resolution=$RUNS/sr-codi/entry" \
    --entry "super-resolution-controlnet-lora=$RUNS/sr-controlnet-lora-codi/entry" \
    --entry "super-resolution-t2i=$RUNS/sr-t2i-codi/entry" \
    --entry "depth=$RUNS/depth-codi/entry" --entry "edit=$RUNS/edit-codi-sr-long/entry" \
    --results "$out/super-resolution-scenes/seed$s0/results.json" \
    --results "$out/super-resolution-photos/seed$s0/results.json" \
    --results "$out/depth/seed$s0/results.json" --results "$out/edit/seed$s0/results.json" \
    ${SR_DEFAULTS:---default super-resolution=prev+ilvr:4 --default super-resolution-t2i=prev+ilvr:4 \
      --default super-resolution-controlnet-lora=prev+ilvr:4}
}

case "${1:-all}" in
  train) shift; train_all "$@" ;;
  eval) eval_all ;;
  zoo) build_zoo ;;
  all) train_all; eval_all; build_zoo ;;
  *) echo "usage: bash experiments/zoo_v2.sh [train [RUN...]|eval|zoo|all]" >&2; exit 2 ;;
esac
