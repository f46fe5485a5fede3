#!/usr/bin/env bash
# On a machine with GPUs: the tests that skip on CPU (DeepSpeed ZeRO-2 offload and FSDP training the UNet and the
# text encoder together on the tiny model), and the training tests on real GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print(torch.cuda.device_count(), 'GPU(s)')"
.venv/bin/python -m pytest -q tests/test_distributed.py tests/test_train.py "$@"
