"""Pallas kernels for Mosaic GPU (Hopper) and Mosaic TPU, each with a plain-jnp reference
(wkv7/ also keeps a Pallas Triton GPU forward, and its GPU backward is Triton: see wkv7/api.py).

One subpackage per operation, whose `__init__` is its public API:

  flash_attention/  flash_attention, attention_reference, FlashAttentionConfig
  block_sparse/     block_sparse_attention under a static Mask (CausalMask,
                    LocalMask, ...), build_block_map, the reference
  nsa_selection/    selected_block_attention (NSA's selection branch), the reference
  wkv7/             wkv7_pallas (RWKV-7's WKV recurrence by chunks), Wkv7Config,
                    the jnp forms wkv7 / wkv7_chunked (also the model's 'xla' path)
  ssd/              ssd: Mamba-2's state-space-duality scan (TPU kernels, and
                    Triton ones on Hopper), the chunked jnp reference
  common/           what they share: the chip config (common.config, public),
                    masking and tiling, the call plan, the TPU and GPU helpers,
                    the online-softmax and backward steps

Inside an operation, files are named by role:

  api.py            the entry point: checks, config, layout and padding, and the
                    custom VJP that calls the platform's kernels
  reference.py      the plain-jnp oracle, same signature
  tpu.py, gpu.py    the forward kernel of that platform, and what its backward
                    shares with it
  tpu_bwd.py,       the backward kernels (dq and dk/dv); they import from their
  gpu_bwd.py        forward twin, never the reverse
  tpu_core.py       (NSA) the XLA driver of the TPU kernels: query chunks and
                    their custom VJP
  chunk.py          (WKV-7) the in-chunk matrix form and its VJP, as 2-D array
                    code that both platforms' kernel bodies call
  bwd_step.py       (SSD) one chunk's backward maths, run by both backward kernels

The forward / backward rule holds in common/ too: tpu_steps and tpu_steps_bwd,
gpu_cta and gpu_cta_bwd. Imports point down: an operation imports common/ and
never another operation; pallas_kernels imports nothing from layers/, models/,
train/ or configs/. Shape letters follow the legend in layers/__init__.py.
"""
