"""Job configuration: a frozen dataclass tree loaded from TOML and validated at load.

Every key has a type, a default, a one-sentence description and, where it is an enumeration, a
closed set of values (sections.py); an unknown key or a bad value raises ConfigError naming the
key and what is allowed (load.py).
"""
from .load import (STORED_COLUMNS, ConfigError, config_from_dict, load_job, parse_memory,
                   parse_override, settings_differences, settings_hash)
from .sections import (CHOICES, DEFAULT_MODEL, POOLING_PRESETS, POSITIVE, PRECISIONS, RESCORE_PRECISIONS,
                       SECTIONS, SINK_CHOICES, SINK_KEYS, EncodeConfig, IndexConfig, InputConfig, JobConfig, ModelConfig,
                       OutputConfig, SinkConfig)

__all__ = [
    "CHOICES", "DEFAULT_MODEL", "POOLING_PRESETS", "POSITIVE", "PRECISIONS", "RESCORE_PRECISIONS", "SECTIONS", "SINK_CHOICES",
    "SINK_KEYS", "STORED_COLUMNS", "ConfigError", "EncodeConfig", "IndexConfig", "InputConfig",
    "JobConfig", "ModelConfig", "OutputConfig", "SinkConfig", "config_from_dict", "load_job",
    "parse_memory", "parse_override", "settings_differences", "settings_hash",
]
