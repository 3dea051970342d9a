#!/usr/bin/env bash
# vLLM server mode on one machine: `trl vllm-serve` on the first GPU(s), rltk training on the rest.
#
#   launch/vllm_server.sh RECIPE [dotted overrides...]
#
# With 8 GPUs and the defaults, the server runs on GPU 0 and training on GPUs 1-7:
#   CUDA_VISIBLE_DEVICES=0 trl vllm-serve --model MODEL --tensor-parallel-size 1 --port 8000 ...
#   CUDA_VISIBLE_DEVICES=1,...,7 accelerate launch --config_file launch/ddp.yaml --num_processes 7 \
#       -m rltk train RECIPE rollout.engine=vllm rollout.vllm.mode=server ...
# The trainer streams its weights to the server after every optimizer step (an NCCL group on
# GROUP_PORT) and samples through it; see docs/vllm.md. Check the layout first, without GPUs:
#   rltk check RECIPE --launch launch/ddp.yaml rollout.vllm.mode=server
#
# Environment (defaults in brackets):
#   MODEL [the recipe's model.name_or_path]   TP [1] server tensor parallel   DP [1] server data parallel
#   NUM_GPUS [all, from nvidia-smi]            HOST [127.0.0.1]   PORT [8000]   GROUP_PORT [51216]
#   ACCELERATE_CONFIG [launch/ddp.yaml]        MAX_MODEL_LEN [vLLM's default]
#   GPU_MEMORY_UTILIZATION [0.9]               HEALTH_TIMEOUT [900] seconds to wait for the server
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: launch/vllm_server.sh RECIPE [overrides...]" >&2
  exit 2
fi
RECIPE=$1
shift

TP=${TP:-1}
DP=${DP:-1}
HOST=${HOST:-127.0.0.1}
PORT=${PORT:-8000}
GROUP_PORT=${GROUP_PORT:-51216}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-launch/ddp.yaml}
GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.9}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-900}
NUM_GPUS=${NUM_GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)}
MODEL=${MODEL:-$(python -c 'import sys; from rltk.config import load_recipe; print(load_recipe(sys.argv[1]).model.name_or_path)' "$RECIPE")}

SERVER_GPUS=$((TP * DP))
TRAIN_PROCS=$((NUM_GPUS - SERVER_GPUS))
if (( TRAIN_PROCS < 1 )); then
  echo "vllm_server.sh: the server takes $SERVER_GPUS of $NUM_GPUS GPUs (TP × DP); none is left for training" >&2
  exit 2
fi
SERVER_DEVICES=$(seq -s, 0 $((SERVER_GPUS - 1)))
TRAIN_DEVICES=$(seq -s, "$SERVER_GPUS" $((NUM_GPUS - 1)))

SERVER_ARGS=(--model "$MODEL" --tensor-parallel-size "$TP" --data-parallel-size "$DP" --host "$HOST" --port "$PORT"
             --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION")
if [[ -n ${MAX_MODEL_LEN:-} ]]; then
  SERVER_ARGS+=(--max-model-len "$MAX_MODEL_LEN")
fi

echo "vllm_server.sh: vLLM server on GPU(s) $SERVER_DEVICES, training on $TRAIN_DEVICES ($TRAIN_PROCS processes)" >&2
CUDA_VISIBLE_DEVICES=$SERVER_DEVICES trl vllm-serve "${SERVER_ARGS[@]}" &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true' EXIT

# Wait until the server answers /health (it loads the model first), or give up if it died.
deadline=$((SECONDS + HEALTH_TIMEOUT))
until curl -sf "http://$HOST:$PORT/health" >/dev/null 2>&1; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "vllm_server.sh: the vLLM server exited before it became healthy" >&2
    exit 1
  fi
  if (( SECONDS > deadline )); then
    echo "vllm_server.sh: the vLLM server was not healthy after ${HEALTH_TIMEOUT}s" >&2
    exit 1
  fi
  sleep 5
done
echo "vllm_server.sh: server healthy at http://$HOST:$PORT" >&2

CUDA_VISIBLE_DEVICES=$TRAIN_DEVICES accelerate launch --config_file "$ACCELERATE_CONFIG" --num_processes "$TRAIN_PROCS" \
  -m rltk train "$RECIPE" \
  rollout.engine=vllm rollout.vllm.mode=server \
  rollout.vllm.server_host="$HOST" rollout.vllm.server_port="$PORT" rollout.vllm.group_port="$GROUP_PORT" \
  rollout.vllm.tensor_parallel_size="$TP" rollout.vllm.server_data_parallel_size="$DP" \
  "$@"
