"""Next-token prediction: the task of decoder language models (Llama, MoE, ...).

Its data is packed text: a TFDS dataset (`config.data.name`, the embedded
corpus by default) tokenized and packed by the grain pipeline in train/data/.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.family import ModelFamily
from train import metrics as metrics_lib
from train import sampling
from train.data import corpus
from train.data import pipeline
from train.data import tokenizers

TOKEN_AXES = ("batch", "length")


def token_losses(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token cross entropy and log-partition in float32.

  Args:
    logits: [b, t, v] scores.
    targets: [b, t] int32 next tokens.
  Returns:
    (cross_entropy [b, t], log_z [b, t]).
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_z - target_logit, log_z


def is_argmax(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """`argmax(logits, -1) == targets` for finite logits (first index on ties), without argmax.

  An argmax is a reduction over (value, index) pairs, which XLA:CPU runs as a
  slow scalar loop (18 ms of the tiny Llama's train step). The target is the
  argmax iff no logit beats it and no earlier one ties it: two plain reductions.

  Args:
    logits: [b, t, v].
    targets: int [b, t].
  Returns:
    bool [b, t].
  """
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)
  index = jnp.arange(logits.shape[-1], dtype=targets.dtype)
  beaten = (logits > target_logit) | ((logits == target_logit) & (index < targets[..., None]))
  return ~jnp.any(beaten, axis=-1)


def next_token_sums(logits: jax.Array, batch, opt_config) -> tuple[jax.Array, dict]:
  """Summed loss (cross entropy + z-loss) and metric sums of next-token prediction.

  Args:
    logits: [b, t, v].
    batch: holds `targets` int [b, t] and `loss_mask` float [b, t].
    opt_config: `config.opt` (for `z_loss`).
  """
  cross_entropy, log_z = token_losses(logits, batch["targets"])
  weight = batch["loss_mask"].astype(jnp.float32)
  ce_sum = jnp.sum(cross_entropy * weight)
  z_sum = jnp.sum(jnp.square(log_z) * weight)
  correct = jnp.sum(is_argmax(logits, batch["targets"]) * weight)
  metrics = {"loss": ce_sum, "z_loss": z_sum, "accuracy": correct, "weight": jnp.sum(weight)}
  return ce_sum + opt_config.z_loss * z_sum, metrics


@dataclasses.dataclass(frozen=True)
class LanguageModelTask:
  """Packed next-token prediction with z-loss; samples and scores at the end.

  Batches hold `inputs`, `targets`, `segment_ids`, `positions` (int32 [b, t])
  and `loss_mask` (float32 [b, t]) as made by `train.data.pipeline`.

  Attributes:
    family: the model family (its `init_cache` builds the KV cache for sampling).
  """
  family: ModelFamily
  modality = "text"
  throughput_unit = "tokens"
  console_keys = ()

  def check_config(self, config):
    m, d = config.model, config.data
    if d.seq_len > m.max_seq_len:
      raise ValueError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}.")
    vocab = tokenizers.get_tokenizer(d.tokenizer).vocab_size
    if vocab > m.vocab_size:
      raise ValueError(f"The tokenizer ({d.tokenizer!r}) has {vocab} tokens but "
                       f"model.vocab_size={m.vocab_size}: raise model.vocab_size.")

  def make_train_iterator(self, config, *, process_index, process_count):
    return pipeline.make_train_iterator(config.data, seed=config.seed,
                                        process_index=process_index,
                                        process_count=process_count)

  def make_eval_batches(self, config, *, process_index, process_count):
    return pipeline.make_eval_batches(config.data, num_batches=config.evals.num_batches,
                                      process_index=process_index,
                                      process_count=process_count)

  def batch_axes(self):
    return {key: TOKEN_AXES
            for key in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}

  def units_per_batch(self, data_config):
    return data_config.global_batch_size * data_config.seq_len

  def train_flops_per_batch(self, model_config, data_config):
    per_token = model_config.train_flops_per_token(data_config.seq_len)
    return None if per_token is None else per_token * self.units_per_batch(data_config)

  def dummy_batch(self, data_config, batch_size):
    seq_len = data_config.seq_len
    ints = np.zeros((batch_size, seq_len), np.int32)
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), ints.shape)
    return {"inputs": ints, "targets": ints, "segment_ids": ints + 1,
            "positions": np.array(positions), "loss_mask": np.ones(ints.shape, np.float32)}

  def init_variables(self, model: nn.Module, rng, batch):
    return dict(model.init(rng, batch["inputs"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"]))

  def loss_sums(self, model, variables, batch, rng, config, *, train=True):
    del rng, train  # Deterministic: no dropout in these models.
    logits = model.apply(variables, batch["inputs"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"])
    return next_token_sums(logits, batch, config.opt)

  def update_model_state(self, model_state, metrics, model):
    del metrics, model  # A dense decoder has no state outside its params.
    return model_state

  def summarize(self, sums):
    return metrics_lib.means(sums)

  def sampler(self, model, config) -> sampling.Sampler:
    return sampling.Sampler(model, self.family.init_cache,
                            tokenizers.get_tokenizer(config.data.tokenizer))

  def sample(self, model, variables, config, prompts):
    return self.sampler(model, config)(variables, list(prompts), config.sample)

  def report(self, model, variables, config, context):
    """Samples `config.sample.prompts`; on the embedded corpus, scores held-out prompts."""
    sample_config, print_fn = config.sample, context.print
    generate = self.sampler(model, config)
    texts = generate(variables, list(sample_config.prompts), sample_config)
    for prompt, text in zip(sample_config.prompts, texts):
      print_fn(f"sample: {prompt!r} -> {text!r}")
    results = {}
    if sample_config.num_scored and config.data.name == "treadle_corpus":
      results.update(self._score_on_corpus(generate, variables, sample_config, print_fn))
    return results

  def _score_on_corpus(self, generate, variables, sample_config, print_fn):
    """Greedy completions of held-out additions and of sentence openings, scored."""
    greedy = sample_config.copy_and_resolve_references()
    with greedy.unlocked():
      greedy.temperature = 0.0
      greedy.max_new_tokens = 8
    pairs = corpus.heldout_addition_prompts(sample_config.num_scored, seed=sample_config.seed)
    completions = generate(variables, [prompt for prompt, _ in pairs], greedy)
    additions = corpus.score_additions(pairs, completions)
    for (prompt, answer), completion in list(zip(pairs, completions))[:3]:
      print_fn(f"held-out: {prompt}{completion.split(chr(10))[0]}   (expected {answer})")
    with greedy.unlocked():
      greedy.max_new_tokens = 40
    openings = corpus.sentence_prompts(sample_config.num_scored, seed=sample_config.seed)
    sentences = corpus.score_sentences(openings, generate(variables, openings, greedy))
    print_fn(f"held-out additions answered right: {additions:.1%} of {len(pairs)}; "
             f"sentence openings finished grammatically: {sentences:.1%} of {len(openings)}")
    return {"addition_accuracy": additions, "grammatical_sentences": sentences}
