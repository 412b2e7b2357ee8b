"""Validated configuration: dataclass schemas that fail at startup with the key, the value and what is allowed."""

from histolight.config.schema import DatasetConfig, check, from_config, to_dict

__all__ = ["DatasetConfig", "check", "from_config", "to_dict"]
