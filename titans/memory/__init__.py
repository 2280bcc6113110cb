"""The neural long-term memory (SPEC.md §2).

- `memory_recurrent`: the reference token loop (autograd inner gradients), for tests.
- `memory_chunked`:   the fast chunk-wise dual form with the same signature and results.
- `NeuralMemory`:     the nn.Module layer (projections, conv, gates, output gate).
- `native_chunks`:    on the CPU the chunk loops run in C++ (built on first use; native.py), or eagerly.
"""

from .chunked import chunks_compiled, chunks_graphed, compile_chunks, graph_chunks, memory_chunked
from .functional import MemoryState, memory_apply
from .layer import NeuralMemory, NeuralMemoryState
from .naive import memory_recurrent
from .native import chunks_native, native_chunks

__all__ = [
    "MemoryState", "NeuralMemory", "NeuralMemoryState", "chunks_compiled", "chunks_graphed", "chunks_native",
    "compile_chunks", "graph_chunks", "native_chunks", "memory_apply", "memory_chunked", "memory_recurrent",
]
