"""Runs a script under accelerate's FSDP on CPU processes, which accelerate gives only to GPU processes: with
ACCELERATE_USE_CPU it runs an FSDP launch as plain data parallelism (MULTI_CPU), silently. This launcher makes the one
change a GPU launch makes to accelerate's state (the distributed type FSDP, with the plugin the launch configured), so
the script's FSDP path runs as on GPUs: accelerate's fully_shard of the model (torch's FSDP2, over gloo), its sharded
checkpoints and their loading, the full state dict gathered for the result. Not covered here: NCCL, GPU memory,
CUDA's mixed-precision kernels, offloading to the CPU.

    accelerate launch --config_file fsdp-on-cpu.yaml tests/fsdp_on_cpu.py train_dreambooth.py --flags ...
"""

import os
import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

accelerate_init = AcceleratorState.__init__


def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    accelerate_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = fsdp_on_cpu
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
