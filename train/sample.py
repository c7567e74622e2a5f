r"""Samples from the latest checkpoint of a workdir.

  python -m train.sample --workdir=/tmp/tiny --prompt="12+34=" --max_new_tokens=8
  python -m train.sample --workdir=/tmp/tiny --prompt="The " --temperature=0.8 \
      --top_k=40 --top_p=0.95 --seed=3

Unset sampling flags take the values of the run's `config.sample`. The
family's task does the sampling (a language model completes the prompts).
"""

from absl import app
from absl import flags

from train import checkpoint
from train import families

_WORKDIR = flags.DEFINE_string("workdir", None, "A Treadle workdir with checkpoints.",
                               required=True)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt(s) to complete.", required=True)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Keep the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus mass (1: all).")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")

# Checked when the flags are parsed: a bad value exits with an error naming its flag.
_RULES = {
    "max_new_tokens": (lambda v: v >= 1, "must be >= 1"),
    "temperature": (lambda v: v >= 0, "must be >= 0 (0 is greedy)"),
    "top_k": (lambda v: v >= 0, "must be >= 0 (0 keeps all tokens)"),
    "top_p": (lambda v: 0 < v <= 1, "must be in (0, 1] (1 keeps all tokens)"),
}


def _register_validators() -> None:
  for name, (check, rule) in _RULES.items():
    flags.register_validator(name, lambda v, check=check: v is None or check(v),
                             message=f"{rule}.")


_register_validators()


def sample(workdir: str, prompts: list[str], step: int | None = None, **overrides) -> list[str]:
  """Completions of `prompts` by the checkpoint in `workdir`; `overrides` set config.sample."""
  config = checkpoint.load_config(workdir, step)
  model, variables = checkpoint.load_model(workdir, step)
  for key, value in overrides.items():
    if value is not None:
      config.sample[key] = value
  task = families.get_family(config.model.family).task
  return task.sample(model, variables, config, prompts)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  completions = sample(_WORKDIR.value, _PROMPT.value, _STEP.value,
                       max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                       top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)
  for prompt, completion in zip(_PROMPT.value, completions):
    print(f"{prompt}{completion}")


if __name__ == "__main__":
  app.run(main)
