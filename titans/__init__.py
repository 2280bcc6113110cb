"""titans: the Titans architecture (Behrouz, Zhong, Mirrokni, 2024) in PyTorch."""

from .checkpoint import load
from .memory import MemoryState, memory_chunked, memory_recurrent
from .model import TitansConfig, TitansLM

__version__ = "0.1.0"
__all__ = ["MemoryState", "TitansConfig", "TitansLM", "load", "memory_chunked", "memory_recurrent"]
