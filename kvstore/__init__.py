"""kvstore: a shared CPU-DRAM pool of vLLM prefix KV blocks, served by a per-node daemon."""

__version__ = "0.1.0"
