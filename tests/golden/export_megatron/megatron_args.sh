# pipetrain plan for tiny-gpt: pp=2 x dp=2 x tp=1, schedule zb-h1
# Megatron-LM arguments, names read in NVIDIA/Megatron-LM@d98e8a64ddf34856e74b24714e3bedb2f5a39553
# launch on 4 GPUs: Megatron infers data-parallel size 2 = world / (tp * pp);
# 4 micro-batches per step = global batch / (micro-batch size * dp).
# usage: source megatron_args.sh; torchrun ... pretrain_gpt.py "${MEGATRON_ARGS[@]}" <model and data args>
# warning: precision amp-autocast: Megatron-LM keeps bf16 weights with fp32 main weights and
#   gradients (--bf16), not fp32 weights cast per use under autocast
# warning: schedule zb-h1: Megatron-LM has no zero-bubble schedule; it runs 1F1B (backward not split
#   into I and W)
MEGATRON_ARGS=(
    --tensor-model-parallel-size 1
    --pipeline-model-parallel-size 2
    --num-layers 4
    --pipeline-model-parallel-layout "Et|t*3L"
    --micro-batch-size 2
    --global-batch-size 16
    --seq-length 16
    --bf16
)
