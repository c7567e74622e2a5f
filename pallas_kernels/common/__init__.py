"""What the kernel families share: chip config, tiling, softmax and gradient steps, helpers.

config: the chips, their block-size tables and FlashAttentionConfig (public:
every family and its callers read it). masking: which keys a query sees, per
element and per tile, block ranges, and the Tiling of one launch. plan: the
call plan of the flash and block-sparse wrappers (checks, tilings, padding).

Mosaic TPU: tpu (layout constants, lane/sublane replication, tile runs),
tpu_steps (the online-softmax tile steps) and tpu_steps_bwd (the dq and dk/dv
tile steps). Mosaic GPU (Hopper): gpu (the Ops wrapper of hardware and
interpreter forms, the warp-specialized launcher, SMEM scratch, the TMA ring),
gpu_cta (the forward CTA over a tile source, with its online softmax) and
gpu_cta_bwd (the dq and dk/dv CTAs over tile sources).
"""
