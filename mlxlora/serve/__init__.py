"""Many adapters on one base: the multi-adapter model (multi.py), weighted merges (merge.py), comparing
adapters on a split (compare.py), generation for requests (engine.py) and the OpenAI-compatible HTTP
server (server.py)."""

from .compare import compare_perplexity, format_perplexity_table
from .merge import add_weighted_adapter
from .multi import Adapter, MultiAdapterModel

__all__ = ["Adapter", "MultiAdapterModel", "add_weighted_adapter", "compare_perplexity", "format_perplexity_table"]
