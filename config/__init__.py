"""The job config: one typed dataclass per section, loaded strictly from YAML plus `key=value` overrides.

This package is the bottom layer: it imports nothing of the project and no torch, so every other
package (data, sharding, serving, trainer) may read it. Unknown keys, wrong types and inconsistent
combinations fail before any work, naming the key; the resolved config is what gets logged.
"""

from config.job import (
                        CheckpointConfig,
                        ConfigError,
                        DataConfig,
                        EvalConfig,
                        ExportConfig,
                        JobConfig,
                        LoaderConfig,
                        LossConfig,
                        ModelConfig,
                        NegativesConfig,
                        OptimConfig,
                        ShardingConfig,
                        TrackingConfig,
                        TrainConfig,
)
from config.loading import dump, flatten, load_config, load_config_text, to_dict

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "ExportConfig", "JobConfig", "LoaderConfig",
           "LossConfig", "ModelConfig", "NegativesConfig", "OptimConfig", "ShardingConfig", "TrackingConfig",
           "TrainConfig", "dump", "flatten", "load_config", "load_config_text", "to_dict"]
