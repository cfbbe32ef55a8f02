"""Model parallelism through Lightning's `ModelParallelStrategy`: FSDP2 per block, tensor parallel plans,
exact meta-device initialisation, and reading sharded (torch distributed checkpoint) checkpoints."""

from lmforge.parallel.fsdp import apply_fsdp
from lmforge.parallel.meta_init import build_on_meta, materialize_and_init
from lmforge.parallel.tensor_parallel import apply_tensor_parallel

__all__ = ["apply_fsdp", "apply_tensor_parallel", "build_on_meta", "materialize_and_init"]
