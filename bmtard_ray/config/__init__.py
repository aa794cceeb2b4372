"""Run configuration: what a run is (:mod:`.schema`), how it is built from presets, files and overrides
(:mod:`.build`), converted to and from plain dicts (:mod:`.convert`) and checked (:mod:`.validate`).

A configuration is resolved once (preset YAML -> user YAML -> ``--set a.b=value`` overrides), validated
before anything runs, and written next to the outputs. The names below are the package's public face.
"""
from __future__ import annotations

from bmtard_ray.config.build import (
                                     apply_dataset_defaults,
                                     build_config,
                                     dataset_settings,
                                     parse_override,
                                     preset_dict,
                                     preset_names,
                                     read_yaml,
)
from bmtard_ray.config.convert import flat_keys, from_dict, nest, replace, to_dict, update
from bmtard_ray.config.schema import (
                                     CONFIG_FORMAT,
                                     EBB_MODES,
                                     ENTROPY_TARGET_MODES,
                                     REDUCTIONS,
                                     AttackConfig,
                                     DataConfig,
                                     EBBConfig,
                                     EvalConfig,
                                     LossConfig,
                                     MethodConfig,
                                     NLBConfig,
                                     OptimConfig,
                                     RunConfig,
                                     TeacherConfig,
                                     TeachersConfig,
                                     data_cache_dir,
                                     teacher_cache_dir,
)
from bmtard_ray.config.validate import validate

__all__ = ["CONFIG_FORMAT", "EBB_MODES", "ENTROPY_TARGET_MODES", "REDUCTIONS", "AttackConfig", "DataConfig",
           "EBBConfig", "EvalConfig", "LossConfig", "MethodConfig", "NLBConfig", "OptimConfig", "RunConfig",
           "TeacherConfig", "TeachersConfig", "apply_dataset_defaults", "build_config", "data_cache_dir",
           "dataset_settings", "flat_keys", "from_dict", "nest", "parse_override", "preset_dict", "preset_names",
           "read_yaml", "replace", "teacher_cache_dir", "to_dict", "update", "validate"]
