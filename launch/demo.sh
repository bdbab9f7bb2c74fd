#!/usr/bin/env bash
# The main job on one CPU: prepare the embedded corpus, train the tiny structured GPT, stop halfway,
# resume it, inspect its checkpoint, export it to Hugging Face (verified) and generate with plain transformers.
#
# Usage: bash launch/demo.sh            (RUN=runs/other bash launch/demo.sh for another run directory)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/setup.sh
set -euo pipefail
RUN=${RUN:-runs/tiny-cpu}
DATA=${DATA:-data/stdlib}
if [ ! -d "$DATA" ]; then
  python tools/prepare_data.py --out "$DATA" --vocab-size 2048
fi
common=(--config configs/tiny-cpu.yaml --set "data.paths=[$DATA]" --set "train.out_dir=$RUN" --resume auto)
echo "== train the first 150 of 300 steps, then stop (as a preempted job would)"
python -m pretrain.train "${common[@]}" --set train.exit_after_steps=150
echo "== resume from the newest checkpoint and finish"
python -m pretrain.train "${common[@]}"
echo "== inspect the newest checkpoint: topology, step, tensors, manifest verified, config diff"
python tools/inspect_checkpoint.py "$RUN/checkpoints" --recipe configs/tiny-cpu.yaml --set "data.paths=[$DATA]" \
  --set "train.out_dir=$RUN" --set checkpoint.resume=auto --tensors optim.step
echo "== export to a Hugging Face LlamaForCausalLM (logits verified against ours)"
python tools/convert_to_hf.py --checkpoint "$RUN/checkpoints" --out "$RUN/hf" --overwrite
echo "== generate with vanilla transformers"
python tools/hf_generate.py --model "$RUN/hf" --prompt "def " --max-new-tokens 48 --temperature 0.8
echo "== TensorBoard: tensorboard --logdir $RUN/tb"
