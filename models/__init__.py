"""Model families, one package each: models/<family>/ holds the family's config
dataclass (config.py), its Flax modules (model.py) and its converters to and
from foreign checkpoint formats (hf.py, ...), and exposes a `ModelFamily` as
`FAMILY`. Shared: config_schema.py (the config dataclass machinery), family.py
(ModelFamily, Converter), hf_io.py (safetensors directories).
"""
