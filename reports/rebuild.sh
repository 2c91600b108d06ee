#!/usr/bin/env bash
# Maintainers: rebuild the checked-in example reports under reports/ (commands run without --out write under the
# git-ignored runs/ instead, so a user's run never touches these files).
#
#   reports/rebuild.sh [FLAG...] [main] [memory] [controls] [identity] [htl] [calibration]
#                                                                  (no group: all six, in this order)
#
# FLAGs (e.g. --overwrite, --recompute) go to every command; a finished run with the same settings is otherwise
# kept as it is. Times on 2 CPU cores: main 5-15 min per model, memory 30-60 min per model, controls ~30 min each,
# identity: the default and the grid ~2 h of single-thread training, the LoRA runs about 1 h each with two threads,
# their lens 16 min and memory 20 min each; htl ~10 min per model; calibration ~20 min. Run from the repository
# root in the installed virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."

flags=() groups=()
for arg in "$@"; do
  case "$arg" in
    -*) flags+=("$arg") ;;
    main|memory|controls|identity|htl|calibration) groups+=("$arg") ;;
    *) echo "rebuild.sh: unknown group '$arg' (main, memory, controls, identity, htl, calibration)" >&2; exit 2 ;;
  esac
done
[ ${#groups[@]} -gt 0 ] || groups=(main memory controls identity htl calibration)

run() { echo "+ bridgeprobe $*" >&2; bridgeprobe "$@" ${flags[@]+"${flags[@]}"}; }

for group in "${groups[@]}"; do
  case "$group" in
    main)  # before memory: --overwrite empties reports/MODEL, which holds memory/
      run run --out reports/smollm2-135m
      run run --model gemma3-270m --out reports/gemma3-270m ;;
    memory)
      run memory --model smollm2-135m --prompts curated --map-items 120 --stride 4 --out reports/smollm2-135m/memory
      run memory --model gemma3-270m --prompts curated --map-items 120 --stride 3 --out reports/gemma3-270m/memory ;;
    controls)  # docs/memory.md, positive controls: the bridge written in place of e1 (present) or another bridge
      # there (absent), through the same analysis; memory.csv is kept compressed (memory-report reads memory.csv.gz)
      bridgeprobe memory-controls --out reports/memory-controls/prompts
      for kind in present absent; do
        run memory --model smollm2-135m --prompts reports/memory-controls/prompts/$kind.jsonl --items 240 \
          --map-items 120 --stride 30 --analyses crosspatch,decoding,alignment --out reports/memory-controls/$kind
        if [ -f reports/memory-controls/$kind/memory.csv ]; then
          gzip -9 -n -f reports/memory-controls/$kind/memory.csv
        fi
      done ;;
    identity)  # docs/identity.md; the grid keeps only run.json, results.csv, comparison.* and metrics.csv per cell
      run reproduce --out reports/identity/reproduce               # the default: the grid's best cell, 5 seeds
      G="--model gpt2 --steps 5000 --lr 2e-3 --weight-decays 1.0 --identity-repeats 10 --eval-every 500 --checkpoint-every 500 --seeds 0 1 2"
      E="--model emb_mlp --steps 10000 --lr 1e-3 --weight-decays 1.0 --identity-repeats 10 --eval-every 1000 --checkpoint-every 1000 --seeds 0 1 2"
      g=reports/identity/grid
      run reproduce $G --tied --identity-form relation --out $g/gpt2-tied-relation
      run reproduce $G --tied --identity-form zero_hop --out $g/gpt2-tied-zero_hop
      run reproduce $G --untied --identity-form relation --out $g/gpt2-untied-relation
      run reproduce --seeds 0 1 2 --init-scales 1.0 0.3 --identity-repeats 50 --out $g/gpt2-untied-zero_hop-knobs
      run reproduce $E --tied --identity-form zero_hop --out $g/emb-res-tied-zero_hop
      run reproduce $E --untied --identity-form zero_hop --out $g/emb-res-untied-zero_hop
      run reproduce $E --tied --no-residual --identity-form zero_hop --out $g/emb-nores-tied-zero_hop
      run reproduce $E --untied --no-residual --identity-form zero_hop --out $g/emb-nores-untied-zero_hop
      run reproduce ${E/--weight-decays 1.0/--weight-decays 0.1 1.0} --untied --identity-form relation --out $g/emb-res-untied-relation
      run reproduce --seeds 0 1 2 --subjects 200 --out $g/gpt2-untied-zero_hop-subjects200
      run reproduce --seeds 0 1 2 --init-scales 0.3 --steps 15000 --eval-every 1500 --checkpoint-every 1500 \
        --out $g/gpt2-untied-zero_hop-init0.3-steps15000
      # the paper's split at its regularization (docs/identity.md, "As the authors ran it"): relation-pair OOD, GPT-2,
      # weight decay x init, 5 seeds per cell, final models kept for scratch-analysis; the identity dose (coverage of
      # the bridges) at weight decay 1; one-hop-only training (no two-hop example at all); Emb-MLP. Each GPT-2 cell
      # about 18 min with one thread; the whole list about 8 h.
      P="--seeds 0 1 2 3 4 --keep-checkpoints --ood relation_pair"
      for cell in "0 1.0" "0.01 1.0" "0.1 1.0" "1.0 1.0" "0 0.3" "0.01 0.3" "0.1 0.3" "1.0 0.3"; do
        set -- $cell
        run reproduce $P --weight-decays $1 --init-scales $2 --out $g/gpt2-untied-zero_hop-relation_pair-wd$1-init$2
      done
      for coverage in 0.25 0.5 0.75; do
        run reproduce $P --weight-decays 1.0 --init-scales 1.0 --identity-coverage $coverage \
          --out $g/gpt2-untied-zero_hop-relation_pair-wd1.0-init1.0-coverage$coverage
      done
      for cell in "0 1.0" "0.1 1.0" "1.0 1.0" "0 0.3" "0.1 0.3" "1.0 0.3"; do
        set -- $cell
        run reproduce $P --no-two-hop-training --weight-decays $1 --init-scales $2 \
          --out $g/gpt2-untied-zero_hop-one_hop_only-wd$1-init$2
      done
      for wd in 0 0.01 0.1 1.0; do
        run reproduce $P --model emb_mlp --steps 10000 --lr 1e-3 --eval-every 1000 --checkpoint-every 1000 \
          --weight-decays $wd --out $g/emb-res-untied-zero_hop-relation_pair-wd$wd-init1.0
      done
      bridgeprobe identity-grid reports/identity/reproduce $g --out $g
      # the dose (OOD accuracy through covered vs uncovered bridges) and the paper's Sec. 4.1 cross-prompt patch
      bridgeprobe scratch-analysis $g/*relation_pair-wd* $g/*one_hop_only* --out reports/identity/scratch-analysis \
        ${flags[@]+"${flags[@]}"}
      gzip -9 -n -f reports/identity/scratch-analysis/ood_items.csv  # 4 MB of per-query rows, kept compressed
      # Ma et al.'s reversal control as they ran it: full fine-tuning on their 100 pairs, three training sets. About
      # 5 h each (forward: 2 h) on 2 CPU cores, minutes on a GPU: set DEVICE=cuda on a GPU host.
      for form in ocr forward idn; do
        run reversal-sft --form $form --device ${DEVICE:-cpu} --checkpoint-every 100 \
          --out reports/identity/reversal-sft-$form
      done
      # LoRA (docs/identity.md; each about 1 h with two threads): two-hop on the bridge split, its lens on every state,
      # and the reversal-curse control
      run finetune --model smollm2-135m --steps 480 --batch-size 16 --lora-layers 12 --lr 3e-3 --eval-every 160 \
        --checkpoint-every 160 --seeds 0 1 2 --eval-items 256 --out reports/identity/finetune
      run finetune-lens reports/identity/finetune --per-split 128 --out reports/identity/finetune-lens
      run finetune --task reversal --pairs 128 --reverse-train-fraction 0.1 --relations 4 --lora-layers 12 --lr 3e-3 \
        --steps 320 --batch-size 16 --eval-every 80 --checkpoint-every 80 --identity-repeat 1 --seeds 0 1 2 \
        --eval-items 256 --out reports/identity/reversal
      run finetune --task reversal --pairs 128 --reverse-train-fraction 0.1 --relations 4 --lora-layers 0 \
        --identity-of everyone --lr 3e-3 --steps 320 --batch-size 16 --eval-every 80 --checkpoint-every 80 \
        --identity-repeat 1 --seeds 0 --eval-items 256 --out reports/identity/reversal-all-blocks-everyone
      # the shared-memory analyses before and after fine-tuning (seed 0's base model and adapters)
      F=reports/identity/finetune
      for state in base no_identity identity; do
        adapter=(); [ $state = base ] || adapter=(--adapter $F/adapters/${state}_seed0)
        run memory --model smollm2-135m ${adapter[@]+"${adapter[@]}"} --prompts $F/data/seed0/prompts.jsonl --items 384 \
          --map-items 120 --stride 6 --analyses crosspatch,decoding,alignment --out reports/identity/finetune-memory/$state
      done
      # the comparison tables and pages of the finished LoRA runs, from their files (after a change to the statistics)
      for dir in reports/identity/finetune reports/identity/finetune-lens reports/identity/reversal \
          reports/identity/reversal-all-blocks-everyone; do
        bridgeprobe finetune-report $dir
      done ;;
    htl)  # the README's Hopping Too Late rows (the data are not copied in: HTL_DIR, default ../shared/data/...)
      H=${HTL_DIR:-../shared/data/hopping_too_late}
      for model in smollm2-135m gemma3-270m; do
        run lens --model $model --prompts $H/raw_llama3-8b_two_hop_correct.csv $H/raw_llama3-8b_two_hop_incorrect.csv \
          --preset hopping_too_late --out reports/htl/$model --report
      done ;;
    calibration)  # docs/statistics.md: the decision rule's error rates on planted effects
      python tests/benchmarks/bench_decision_rule.py --families 1000 --resamples 1999 --out reports/calibration ;;
  esac
done
