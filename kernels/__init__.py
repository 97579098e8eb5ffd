"""Fused Cog attention kernels: Triton for CUDA GPUs and a memory-efficient CPU path."""
