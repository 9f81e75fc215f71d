"""Data for AIM pretraining: beton writers (used by ``python -m data_prep``) and FFCV-backed loaders.

Rooms, each above what it imports: ``writers`` (-> ``images``, ``beton``, ``labels``) writes betons, and
``webdataset``, ``ray_convert`` and ``hf`` (-> ``writers``) feed it tars and Hugging Face datasets; ``loader``
(-> ``sources``, ``sampling``, ``kernels``, ``bicubic``) reads them; ``beton`` is the read side of a beton
and its sidecar that both share; ``ffcv_ops`` offers the same decoders inside ``ffcv.loader.Loader``.
"""

from .beton import ConversionError, inspect_betons, is_complete, read_class_names, read_sidecar
from .hf import convert_hf
from .images import decode_image
from .loader import EvalLoader, TrainLoader, build_eval_loader, build_train_loader
from .sampling import center_crop_boxes, sample_crop_boxes
from .sources import DEFAULT_MIXTURE
from .webdataset import convert_webdataset
from .writers import WriteOptions, convert_imagefolder

__all__ = [
    "DEFAULT_MIXTURE",
    "ConversionError",
    "EvalLoader",
    "TrainLoader",
    "WriteOptions",
    "build_eval_loader",
    "build_train_loader",
    "center_crop_boxes",
    "convert_hf",
    "convert_imagefolder",
    "convert_webdataset",
    "decode_image",
    "inspect_betons",
    "is_complete",
    "read_class_names",
    "read_sidecar",
    "sample_crop_boxes",
]
