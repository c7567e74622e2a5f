"""The main binary's start-up lines: a one-line summary, the full config in WORKDIR/config.json."""

import json
import pathlib

import ml_collections
from absl import flags
from ml_collections import config_flags

from configs import llama
from configs import llama_tiny
from train import checkpoint
from train import run_summary

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_summary_names_family_source_mesh_and_overrides():
  config = llama.get_config("size=1b")
  config.mesh.fsdp = -1
  line = run_summary.summary(config, source="configs/llama.py:size=1b",
                             overrides={"opt.lr": 3e-4, "data.data_dir": "/d"}, num_devices=8)
  assert line == ("llama (configs/llama.py:size=1b) on 8 devices, mesh fsdp=8; "
                  "overrides: opt.lr=0.0003, data.data_dir='/d'")
  single = run_summary.summary(llama_tiny.get_config(), source="configs/llama_tiny.py",
                               overrides={}, num_devices=1)
  assert single == "llama (configs/llama_tiny.py) on 1 device; overrides: none"


def test_announce_prints_a_few_lines_and_writes_the_full_config(tmp_path, capsys):
  config = llama_tiny.get_config()
  run_summary.announce(config, str(tmp_path), source="configs/llama_tiny.py", overrides={},
                       num_devices=1)
  printed = capsys.readouterr().out.splitlines()
  assert len(printed) == 2 and printed[0].startswith("Run: llama (configs/llama_tiny.py)")
  assert printed[1] == f"Full config: {tmp_path / 'config.json'}"
  saved = json.loads((tmp_path / "config.json").read_text())
  # The same JSON a checkpoint holds; it rebuilds the config.
  assert saved == json.loads(json.dumps(checkpoint.config_json(config)))
  rebuilt = ml_collections.ConfigDict(saved)
  assert rebuilt.model.to_dict() == json.loads(json.dumps(config.model.to_dict()))


def test_config_flag_reports_the_file_argument_and_the_overrides():
  """The two config_flags calls train/main.py makes for the summary."""
  source = f"{ROOT / 'configs' / 'llama.py'}:size=150m"
  argv = ["main", f"--config={source}", "--config.opt.lr=0.001",
          "--config.train.num_steps=7"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  assert config_flags.get_config_filename(flag_values["config"]) == source
  assert config_flags.get_override_values(flag_values["config"]) == {
      "opt.lr": 0.001, "train.num_steps": 7}
