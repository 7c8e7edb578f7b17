"""Speed modes: exact mode's CUDA speed-ups (attention backend, regional compilation, compile-safe LoRA
slots), the per-request modes (exact, fast, turbo) with fast mode's step cache and turbo's scheduler,
FlashAttention-4, the VAE's layout and first-frame encoding cache, and the compile cache kept across
replicas."""
