"""What the inference processes' forkserver imports once, before it forks any of them.

A new interpreter spends most of its time to a loaded embedding model importing torch and
sentence-transformers (``python -X importtime``: sentence-transformers pulls in transformers
and scikit-learn; docs/benchmarks.md, ``soak_bench respawn``). ``ProcessEmbedder`` forks its
children from multiprocessing's forkserver (a clean, single-threaded process of its own),
which imports this module first: a child then only loads its model, the first ones and each
replacement of one that died. Imported by that forkserver, never by a serving process.
"""

import gc

import sentence_transformers  # noqa: F401
import torch  # noqa: F401

from memory.inference import process  # noqa: F401  (the children's main)

# Out of the cyclic collector's reach, the imported modules' objects are never written to by
# a child's collections, so their pages stay shared with the forkserver (gc.freeze's purpose).
gc.freeze()
