"""The model zoo: students and teachers by name, and strict checkpoint loading.

Every model takes images in [0, 1] (NCHW, channels_last works too) and carries its own input normalisation
(``mean``/``std``) as non-persistent buffers, so attacks work in pixel units and state-dict keys stay those
of the public checkpoints each architecture is laid out to load.
"""
from __future__ import annotations

from bmtard_ray.models.files import (
                                          CheckpointError,
                                          LoadedModel,
                                          inspect_checkpoint,
                                          load_model,
                                          load_pretrained,
                                          load_weights,
                                          model_record,
                                          pyautoattack_resnet18_path,
                                          read_state_dict,
)
from bmtard_ray.models.mobilenetv2 import MobileNetV2
from bmtard_ray.models.refs import attach_normalization, build_ref, check_outputs, normalization_of
from bmtard_ray.models.resnet import ProjectionResNet56, ResNet18, ResNet56
from bmtard_ray.models.small import InputNormalization, SmallCNN, TinyCNN
from bmtard_ray.models.wideresnet import DMWideResNet, WideResNet
from bmtard_ray.models.zoo import LAYOUTS, MODEL_NAMES, build_model, count_parameters, layout_for_keys

__all__ = [
    "MODEL_NAMES", "LAYOUTS", "build_model", "layout_for_keys", "load_model", "load_pretrained", "inspect_checkpoint",
    "LoadedModel", "model_record", "count_parameters", "load_weights", "read_state_dict", "pyautoattack_resnet18_path",
    "CheckpointError", "InputNormalization", "ResNet18", "ResNet56", "ProjectionResNet56", "MobileNetV2", "WideResNet",
    "DMWideResNet", "SmallCNN", "TinyCNN", "build_ref", "check_outputs", "attach_normalization", "normalization_of",
]
