#!/usr/bin/env bash
# Everything one lent-GPU session runs, in one bounded call (the device tool allows ~15 minutes of
# GPU time per session, all tries together). Each stage has its own time limit and writes its results
# as it goes, so a stage that runs long costs its own results only.
#
#   1. benchmarks/gpu_checks.py (issues 2 and 3): numerics against the CPU float64 reference,
#      causality / streaming of every variant, memory speed, 170m model speed at 2K / 8K / 32K.
#   2. experiments/table2.py on the GPU (issue 5): MAC and Transformer++ fine-tuned on S-NIAH-1/2/3
#      at 512 tokens, each for a fixed number of minutes, then evaluated at 1x / 4x / 16x / 64x.
#
# Inputs (copied into .gpu/, which git ignores, by `benchmarks/gpu_session.sh --stage`): the corpus
# (data/corpus; the token caches are rebuilt there) and the Table-1 checkpoints the fine-tunes start
# from (weights only). Results go to $OUT (the device tool's folder; default out/gpu_session).
#
#   benchmarks/gpu_session.sh --stage                # here: fill .gpu/
#   OUT=... benchmarks/gpu_session.sh                # there: the run (7.5 minutes on an H100, 2026-11-26)
#   QUICK=1 OUT=/tmp/g benchmarks/gpu_session.sh     # a CPU dry run of the same steps, small
#
# PLAN=graphs runs instead (2026-11-27, after the chunk loops became replayable CUDA graphs):
#   1. gpu_checks.py numerics (eager and graphed loops vs the CPU float64 token loop) and causality /
#      streaming of every variant with graphs on;
#   2. gpu_checks.py model speed, 170m, every variant at 2K / 8K / 32K, with graphs on;
#   3. compile_speed.py: memory layer at 4096 and 170m lmm / mac steps at 2048, eager vs graphs.
#   PLAN=graphs OUT=... benchmarks/gpu_session.sh   (under 6 minutes; no staging needed)
# PLAN=long: the 170m memory variants at 32K with graphs (about 35-50 s a step each; 7 minutes).
# PLAN=passkey (after --stage-passkey): the 1024 pass-key MAC fine-tuned at 1K-2K tokens on the GPU
#   (second_order 0.5 + detach_kv, graphs), then lmm / mal at 8K and the memory variants at 32K (170m).
# PLAN=niah123 (issue 5, Table 2): the S-NIAH-1/2/3 fine-tune continued on the GPU, two seeds side by
#   side (answer-only loss), then both read at 2K and 8K there; carry data/corpus and data/tokens.
#   The tracked tree is over the device tool's 64 MiB (committed weights under results/; on
#   2026-11-29 `git ls-files '*.safetensors'` held 87.5 MB of the tree's 92.0 MB): before the call,
#   `benchmarks/gpu_session.sh --stash results/table2_niah123/fs0_2048_mix` parks every other weight
#   file in .gpu_stash/ (ignored, so it does not travel); `--unstash` puts them back after.
# PLAN=combo: compile_speed.py with the compiled chunk step captured in the graphs (memory layer at
#   4096, 170m lmm step at 2048), eager / graphs / compiled+graphs, in about 3 minutes.
#
# MAC_COMPILE=1 compiles MAC's memory chunk step (train.compile): ~4x faster memory on an H100 after
# about a minute of compiling (2026-11-26: measured on the memory layer, not yet on this fine-tune).
# MAC_GRAPHS=1 runs MAC's fine-tune and evaluation with the memory's chunk loops as CUDA graphs
# (--cuda-graphs: 4-8x faster memory on an H200, 2026-11-27, bitwise equal to eager); with
# MAC_COMPILE=1 as well, the compiled step is captured (9x on the memory layer).
# MAC_INIT=1 fine-tunes the MAC trained with forgetting towards W_0 (out/table1_forget_to_init/mac-s0,
# staged as .gpu/table1_init) with --set model.forget_to=init: full backprop stays stable there.
# Evaluation streams all examples of a cell side by side (--eval-batch).
set -u
if [ "${1:-}" = "--stage" ]; then
    rm -rf .gpu && mkdir -p .gpu/data
    cp -r data/corpus .gpu/data/corpus
    for src in out/table1/mac-s0 out/table1/transformer-s0 out/table1_forget_to_init/mac-s0; do
        ckpt=$(ls -d $src/checkpoints/step_* 2>/dev/null | tail -1)
        if [ -z "$ckpt" ]; then echo "no checkpoint in $src (train it with experiments/table1.py): skipped"; continue; fi
        case $src in *forget_to_init*) to=.gpu/table1_init ;; *) to=.gpu/table1 ;; esac
        dest=$to/$(basename "$src")/checkpoints/$(basename "$ckpt")
        mkdir -p "$dest" && cp -r "$ckpt"/config.json "$ckpt"/model.safetensors "$ckpt"/tokenizer "$dest"/
    done
    du -sh .gpu
    exit 0
fi
if [ "${1:-}" = "--stash" ]; then  # the device tool sends at most 64 MiB: park the committed weights
    # in .gpu_stash/ (ignored, so it stays here), all but those under the folders named after --stash
    shift
    git ls-files '*.safetensors' | while read -r f; do
        keep=""; for k in "$@"; do case $f in "${k%/}"/*) keep=1 ;; esac; done
        [ -n "$keep" ] || { mkdir -p ".gpu_stash/$(dirname "$f")" && mv "$f" ".gpu_stash/$f"; }
    done
    echo "parked $(find .gpu_stash -name '*.safetensors' | wc -l) weight files in .gpu_stash/; put them back with --unstash"
    exit 0
fi
if [ "${1:-}" = "--unstash" ]; then  # after the device call: every parked file back in place
    [ -d .gpu_stash ] || { echo "nothing parked"; exit 0; }
    (cd .gpu_stash && find . -type f) | while read -r f; do mkdir -p "$(dirname "$f")" && mv ".gpu_stash/$f" "$f"; done
    rm -rf .gpu_stash && git status --short -- '*.safetensors'
    exit 0
fi
if [ "${1:-}" = "--stage-passkey" ]; then  # PLAN=passkey's inputs: the corpus and the 1024 pass-key MAC
    src=${PK_FROM:-out/pk1024_more_so05kv/checkpoints/step_00000500}
    [ -f "$src/model.safetensors" ] || { echo "no checkpoint at $src (PK_FROM=...)"; exit 1; }
    rm -rf .gpu && mkdir -p .gpu/data .gpu/pk_init
    cp -r data/corpus .gpu/data/corpus
    cp -r "$src"/config.json "$src"/model.safetensors "$src"/tokenizer .gpu/pk_init/
    du -sh .gpu
    exit 0
fi
# every plan: the output folder, the interpreter, and the device it ran on
OUT=${OUT:-out/gpu_session}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; $PY -c "import torch; print('torch', torch.__version__)"; } > "$OUT/device.txt"
if [ "${PLAN:-}" = "long" ]; then  # issue 3's missing cells: the 170m memory variants at 32K, graphs on
    A="--lengths 32768 --cell-budget 120"; [ -n "${QUICK:-}" ] && A="--device cpu --quick --lengths 128"
    timeout -k 10 ${LONG_S:-420} $PY benchmarks/gpu_checks.py $A --skip numerics,models,memory --graphs \
        --variants ${LONG_VARIANTS:-ttt_mlp,mag,mac,lmm,mal} --deadline ${LONG_D:-400} --out "$OUT/long" > "$OUT/long.log" 2>&1
    echo "long exit $?" >> "$OUT/device.txt"
    exit 0
fi
if [ "${PLAN:-}" = "passkey" ]; then  # issue 5 on the GPU, then issue 3's missing 170m cells
    # 1. the 1024 pass-key MAC (staged by --stage-passkey) fine-tuned on S-NIAH-1 rows of 1K-2K tokens
    #    (task_lengths=varied) with second_order 0.5 + detach_kv, the chunk loops as CUDA graphs, for
    #    PK_MIN minutes; its weights come back in pk2048_gpu.tgz for the probes on the CPU.
    if [ -n "${QUICK:-}" ]; then
        T="--set data.seq_len=256 --set train.batch_size=2 --set train.steps=3 --set train.device=cpu"
        PK_S=300; S8=200; S32=200; A="--device cpu --quick"; L8=64; L32=128
    else
        T="--set data.seq_len=2048 --set train.batch_size=${PK_BATCH:-16} --set train.steps=${PK_STEPS:-300}"
        T="$T --set train.device=cuda --set train.cuda_graphs=true --set train.max_minutes=${PK_MIN:-4}"
        PK_S=${PK_S:-290}; S8=${S8:-50}; S32=${S32:-240}; A="--cell-budget 90"; L8=8192; L32=32768
    fi
    R=out/pk2048_gpu
    rm -rf $R
    timeout -k 20 $PK_S $PY -m titans train --config configs/tiny_mac.yaml --set data.dir=.gpu/data \
        --set data.tasks=niah_single_1 --set data.task_mix=1.0 --set data.task_loss=all \
        --set data.task_lengths=varied --set model.write_norm=true --set model.second_order=0.5 \
        --set model.detach_kv=true --set optim.lr=5e-4 --set optim.warmup_steps=20 --set train.seed=2 \
        --set train.init_from=.gpu/pk_init --set train.ckpt_every=50 --set train.keep_last=100 \
        --set train.eval_every=100000 --set train.eval_windows=8 --set train.log_every=5 \
        --set train.progress=false --set train.tensorboard=false --set train.out=$R $T > "$OUT/pk_train.log" 2>&1
    echo "passkey train exit $?" >> "$OUT/device.txt"
    last=$(ls -d $R/checkpoints/step_* 2>/dev/null | tail -1)
    tar czf "$OUT/pk2048_gpu.tgz" --exclude=trainer.pt $R/config.yaml $R/metrics.jsonl $R/summary.json ${last:-} 2>> "$OUT/device.txt"
    # 2. lmm and mal at 8K (NaN in the forward in the last session), the memory variants at 32K
    timeout -k 10 $S8 $PY benchmarks/gpu_checks.py $A --lengths $L8 --skip numerics,models,memory --graphs \
        --variants lmm,mal --deadline $((S8 - 10)) --out "$OUT/speed_8k" > /tmp/speed_8k.log 2>&1
    echo "8k exit $?" >> "$OUT/device.txt"
    timeout -k 10 $S32 $PY benchmarks/gpu_checks.py $A --lengths $L32 --skip numerics,models,memory --graphs \
        --variants mac,lmm,mag,mal,ttt_mlp --deadline $((S32 - 10)) --out "$OUT/speed_32k" > /tmp/speed_32k.log 2>&1
    echo "32k exit $?" >> "$OUT/device.txt"
    tail -n 30 /tmp/speed_8k.log /tmp/speed_32k.log >> "$OUT/device.txt"  # at most 8 files come back
    exit 0
fi
if [ "${PLAN:-}" = "niah123" ]; then  # issue 5, Table 2: the S-NIAH-1/2/3 fine-tune, two seeds side by side
    # Continues results/table2_niah123/fs0_2048_mix/checkpoint_s{0,1} (300 CPU steps of the 1/2/3 mix)
    # with the answer-only loss, rows of 1K-2K tokens, bf16 autocast and the chunk loops as CUDA
    # graphs, for NIAH_MIN minutes each; then both read S-NIAH-1/2/3 at 2K and 8K on the GPU.
    # Inputs travel with the run: carry data/corpus and data/tokens.
    if [ -n "${QUICK:-}" ]; then
        T="--set data.seq_len=256 --set train.batch_size=2 --set train.steps=3 --set train.device=cpu"
        S=300; E="--device cpu --examples 2 --batch-size 2"; L1=256; L2=512; ES=300
    else
        T="--set train.batch_size=${NIAH_BATCH:-8} --set train.steps=${NIAH_STEPS:-200} --set train.device=cuda"
        T="$T --set train.cuda_graphs=true --set train.bf16=true --set train.max_minutes=${NIAH_MIN:-4.5}"
        S=${NIAH_S:-330}; E="--device cuda --cuda-graphs --examples 20 --batch-size 20"; L1=2k; L2=8k; ES=${NIAH_ES:-200}
    fi
    for s in 0 1; do
        rm -rf out/niah123_gpu_s$s
        timeout -k 20 $S $PY -m titans train --config results/table2_niah123/fs0_2048_mix/config_s0.yaml \
            --set data.dir=data --set train.init_from=results/table2_niah123/fs0_2048_mix/checkpoint_s$s \
            --set train.seed=$s --set data.task_loss=answer --set optim.lr=5e-4 --set optim.warmup_steps=10 \
            --set train.ckpt_every=25 --set train.keep_last=1 --set train.out=out/niah123_gpu_s$s $T \
            > "$OUT/train_s$s.log" 2>&1 &
    done
    wait
    echo "niah123 train done $(date +%T)" >> "$OUT/device.txt"
    for s in 0 1; do
        (for L in $L1 $L2; do
            timeout -k 10 $ES $PY -m titans eval --checkpoint out/niah123_gpu_s$s \
                --task niah_single_1,niah_single_2,niah_single_3 --lengths $L --align 64 $E \
                --out out/niah123_gpu_s$s/eval_$L >> "$OUT/eval_s$s.log" 2>&1
            echo "eval s$s $L exit $? $(date +%T)" >> "$OUT/device.txt"
        done) &
    done
    wait
    for s in 0 1; do  # weights (no optimizer state), logs, metrics and the readings: one file per seed
        last=$(ls -d out/niah123_gpu_s$s/checkpoints/step_* 2>/dev/null | tail -1)
        tar czf "$OUT/niah123_gpu_s$s.tgz" --exclude=trainer.pt out/niah123_gpu_s$s/config.yaml \
            out/niah123_gpu_s$s/metrics.jsonl out/niah123_gpu_s$s/summary.json out/niah123_gpu_s$s/eval_* \
            ${last:-} 2>> "$OUT/device.txt"
    done
    exit 0
fi
if [ "${PLAN:-}" = "combo" ]; then  # compiled step inside the graphs: memory at 4K, the 170m lmm step at 2K
    A=""; [ -n "${QUICK:-}" ] && A="--device cpu --quick"
    timeout -k 10 ${COMBO_S:-200} $PY benchmarks/compile_speed.py $A --lengths ${COMBO_LEN:-4096} --variants lmm \
        --modes eager,graphs,compiled+graphs --deadline ${COMBO_D:-180} --out "$OUT/combo" > "$OUT/combo.log" 2>&1
    echo "combo exit $?" >> "$OUT/device.txt"
    exit 0
fi
if [ "${PLAN:-}" = "graphs" ]; then
    W=$OUT/work  # tarred at the end: the device tool returns at most 8 files
    mkdir -p "$W"
    if [ -n "${QUICK:-}" ]; then
        A="--device cpu --quick"; S1=120; S2=300; S3=300; D2=240; D3=240; CB=60; L=""
    else
        A=""; S1=60; S2=170; S3=110; D2=150; D3=90; CB=25; L="--lengths 4096"
    fi
    timeout -k 10 $S1 $PY benchmarks/gpu_checks.py $A --skip memory,model --graphs --out "$W/checks" > "$W/checks.log" 2>&1
    echo "checks exit $?" >> "$OUT/device.txt"
    timeout -k 10 $S2 $PY benchmarks/gpu_checks.py $A --skip numerics,models,memory --graphs --deadline $D2 \
        --variants lmm,mac,transformer,swa,gated_deltanet,mag,mal,ttt_mlp \
        --cell-budget $CB --out "$W/model_speed_graphs" > "$W/model_speed_graphs.log" 2>&1
    echo "model speed exit $?" >> "$OUT/device.txt"
    timeout -k 10 $S3 $PY benchmarks/compile_speed.py $A $L --modes eager,graphs \
        --deadline $D3 --out "$W/compile_speed" > "$W/compile_speed.log" 2>&1
    echo "compile speed exit $?" >> "$OUT/device.txt"
    tar czf "$OUT/results.tgz" -C "$W" . && rm -rf "$W"
    exit 0
fi
MAC_RUNS=".gpu/table1"; MAC_SET=""
if [ -n "${MAC_INIT:-}" ]; then MAC_RUNS=".gpu/table1_init"; MAC_SET="--set model.forget_to=init"; fi
if [ -n "${QUICK:-}" ]; then
    CHECKS="--device cpu --quick --deadline 60"; CHECKS_S=120
    FT="--seq-len 256 --batch-size 2 --steps 3 --lengths 256,512 --examples 2 --eval-batch 2 --device cpu"
    FT_MAC_S=200; FT_TF_S=200
else
    CHECKS="--deadline 150 --cell-budget 25"; CHECKS_S=170
    FT="--seq-len 512 --batch-size 32 --steps 2000 --lr 1e-3 --lengths 512,2k,8k,32k --examples 6 --eval-batch 6 --device cuda"
    FT_MAC_S=250; FT_TF_S=110
fi
timeout -k 10 $CHECKS_S $PY benchmarks/gpu_checks.py $CHECKS --out "$OUT/gpu_checks" > "$OUT/gpu_checks.log" 2>&1
echo "gpu_checks exit $?" >> "$OUT/device.txt"
# the fine-tunes stop on their own after --max-minutes (with a checkpoint), then evaluate
timeout -k 20 $FT_MAC_S $PY experiments/table2.py --variants mac --seeds 0 --bptt 0 --max-minutes ${MAC_MIN:-2.25} $FT ${MAC_COMPILE:+--compile} ${MAC_GRAPHS:+--cuda-graphs} \
    $MAC_SET --data .gpu/data --table1-runs $MAC_RUNS --runs out/table2_gpu --out out/table2_gpu/results > "$OUT/table2_mac.log" 2>&1
echo "table2 mac exit $?" >> "$OUT/device.txt"
timeout -k 20 $FT_TF_S $PY experiments/table2.py --variants transformer --seeds 0 --bptt 0 --max-minutes ${TF_MIN:-0.75} $FT \
    --data .gpu/data --table1-runs .gpu/table1 --runs out/table2_gpu --out out/table2_gpu/results > "$OUT/table2_transformer.log" 2>&1
echo "table2 transformer exit $?" >> "$OUT/device.txt"
# metrics, summaries, evaluation reports and the fine-tuned weights (no optimizer state): one file
# per model (the device tool returns files of up to 16 MB)
for v in mac transformer; do
    tar czf "$OUT/table2_$v.tgz" --exclude=trainer.pt --exclude='*.png' out/table2_gpu/$v-s0 out/table2_gpu/results 2>> "$OUT/device.txt"
done
ls -la "$OUT" >> "$OUT/device.txt"
