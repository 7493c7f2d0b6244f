"""Stand-in for flash-attn's compiled CUDA extension on a CPU-only install.

flash-attn 2.8.3 is installed from source without its kernels (they need CUDA) because
OpenRLHF imports `flash_attn.bert_padding` at import time; `flash_attn.flash_attn_interface`
imports this module. Any kernel call fails loudly instead of at import.
"""


def __getattr__(name):
    raise RuntimeError(
        f"flash_attn_2_cuda.{name}: flash-attn's CUDA kernels do not exist on this CPU install; "
        "run with --ds.attn_implementation eager (or sdpa)"
    )
