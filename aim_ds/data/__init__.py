"""Data for AIM pretraining: beton writers (used by ``python -m data_prep``) and FFCV-backed loaders."""

from .loader import (
    DEFAULT_MIXTURE,
    EvalLoader,
    TrainLoader,
    build_eval_loader,
    build_train_loader,
    center_crop_boxes,
    sample_crop_boxes,
)
from .writers import (
    ConversionError,
    WriteOptions,
    convert_imagefolder,
    convert_webdataset,
    decode_image,
    inspect_betons,
    is_complete,
    read_class_names,
    read_sidecar,
)

__all__ = [
    "DEFAULT_MIXTURE",
    "ConversionError",
    "EvalLoader",
    "TrainLoader",
    "WriteOptions",
    "build_eval_loader",
    "build_train_loader",
    "center_crop_boxes",
    "convert_imagefolder",
    "convert_webdataset",
    "decode_image",
    "inspect_betons",
    "is_complete",
    "read_class_names",
    "read_sidecar",
    "sample_crop_boxes",
]
