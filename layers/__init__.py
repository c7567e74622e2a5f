"""Flax Linen building blocks shared by every model family.

The shape legend of the whole codebase. A letter (or short token) means the
same thing in every docstring and comment of layers/, models/, pallas_kernels/
and train/; a module that needs a letter not listed here adds it here.

  batch and sequence  b batch · t sequence (query) length · s key/value length
                      (KV-cache slots) · n tokens, b·t flattened
  widths              e embed · v vocab · m MLP hidden (dense, one expert's, or
                      NSA's compression MLP) · L layers
  attention           h query heads · k kv heads · g query heads per kv head (h/k)
                      · d head dim
  blocks and tiles    B block length in tokens (kernel tiles, NSA blocks)
                      · nb blocks along a sequence · T tiles · r rows per tile
  NSA                 l compressed-block length · st compression stride
                      · nc compressed blocks · ns selected blocks per query
  mixture of experts  E experts · K experts per token (top-k) · G expert groups
                      · a assignments (n·K rows, sorted by expert)
                      · C slots per expert (capacity) · X expert-parallel
                      shards · El = E/X experts per shard
  per shard           a prime marks a size inside one shard: b', t', m'
  state space (SSM)   N state size · ng groups sharing B and C (h/ng heads each)
                      · w convolution width; h and d are the SSM heads and head
                      dim, B the chunk length and nb the chunks. Mamba-1: i the
                      inner width (expand·e, the scan's channels, a state [N]
                      each), R the rank of the dt projection
  RWKV-7              R a low-rank width (decay, in-context learning rate,
                      value mix, gate); h heads of head size d (h·d = e), a
                      [d, d] WKV state per head; m the channel-mix width; B the
                      WKV chunk length
  images (UNet)       H height · W width · c channels (of an image or a feature
                      map; NHWC); the spatial attention's sequence is t = H·W

Flat modules hold the basic blocks (linear, embedding, norms, rope, mlp);
subpackages group a concept family (attention/, moe/, ssm/, rwkv/, unet/).
"""
