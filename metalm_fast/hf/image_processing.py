"""preprocessor_config.json -> ImagePreprocessing, the pixel pipeline of a vision encoder.

transformers' image processors (ViTImageProcessor, CLIPImageProcessor,
SiglipImageProcessor) save their settings as ``preprocessor_config.json``:
``do_resize`` / ``size`` / ``resample``, ``do_center_crop`` / ``crop_size``,
``do_rescale`` / ``rescale_factor``, ``do_normalize`` / ``image_mean`` /
``image_std``. A key the file leaves out takes the processor's class default
(:data:`PROCESSOR_DEFAULTS`, per family), as transformers does. A directory
without the file gets those defaults with the resize (and CLIP's crop) set to
the model's ``image_size``, since a processor's stock 224 would not fit a
model of another size.

Keys that name the processor (``image_processor_type``, ``processor_class``,
``feature_extractor_type``) and ``do_convert_rgb`` (the input here is already a
tensor of the model's channels) are not read. Any other key is refused with its
name when it turns something on (a value that is not None, False or empty): it
may change the pixels (``do_pad``, ``crop_pct``, ...), and silently dropping it
would give other pixel values than transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

from metalm_fast.hf.files import HFFormatError
from metalm_fast.models.vision import ImagePreprocessing

__all__ = ["PREPROCESSOR_FILE", "PROCESSOR_DEFAULTS", "read_preprocessing"]

PREPROCESSOR_FILE = "preprocessor_config.json"

_OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

#: The class defaults of each family's image processor, as preprocessor_config.json keys
#: (``default_to_square``: how an int ``size`` reads, a square or CLIP's shortest edge).
PROCESSOR_DEFAULTS = {
    "vit": {
        "do_resize": True,
        "size": {"height": 224, "width": 224},
        "resample": 2,
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "default_to_square": True,
    },
    "clip": {
        "do_resize": True,
        "size": {"shortest_edge": 224},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": _OPENAI_CLIP_MEAN,
        "image_std": _OPENAI_CLIP_STD,
        "default_to_square": False,
    },
    "siglip": {
        "do_resize": True,
        "size": {"height": 224, "width": 224},
        "resample": 3,
        "do_center_crop": False,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "default_to_square": True,
    },
}

#: PIL's resampling codes (the int transformers saves) for the filters torch reproduces;
#: LANCZOS (1), BOX (4) and HAMMING (5) have no F.interpolate mode.
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}
_NOT_READ = {"image_processor_type", "processor_class", "feature_extractor_type", "do_convert_rgb"}
_READ = {
    "do_resize",
    "size",
    "resample",
    "do_center_crop",
    "crop_size",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "default_to_square",
}


def read_preprocessing(path, family: str, image_size: int, channels: int) -> ImagePreprocessing:
    """The ImagePreprocessing of the directory ``path`` for a ``family`` model ("vit",
    "clip", "siglip") of ``image_size`` and ``channels``: its preprocessor_config.json,
    or the family's defaults sized to the model."""
    settings = dict(PROCESSOR_DEFAULTS[family])
    file = Path(path) / PREPROCESSOR_FILE
    if file.is_file():
        try:
            saved = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise HFFormatError(f"{file}: not valid JSON ({error})") from None
        if not isinstance(saved, dict):
            raise HFFormatError(f"{file}: expected a JSON object")
        _check_keys(file, saved)
        settings.update({key: value for key, value in saved.items() if key in _READ})
    else:
        settings["size"] = {"height": image_size, "width": image_size}
        if family == "clip":
            settings["size"] = {"shortest_edge": image_size}
            settings["crop_size"] = {"height": image_size, "width": image_size}
    return _preprocessing(file, settings, channels)


def _check_keys(file: Path, saved: dict) -> None:
    for key, value in saved.items():
        if key in _READ or key in _NOT_READ or value in (None, False, [], {}):
            continue
        raise HFFormatError(
            f"{file}: {key}={value!r} is not supported (the pixels would differ from "
            "transformers'); supported keys: " + ", ".join(sorted(_READ))
        )


def _preprocessing(file: Path, settings: dict, channels: int) -> ImagePreprocessing:
    square = bool(settings.get("default_to_square", True))
    size, shortest_edge, crop_size = None, None, None
    if settings.get("do_resize"):
        size, shortest_edge = _size(file, "size", settings.get("size"), square)
    if settings.get("do_center_crop"):
        crop_size, edge = _size(file, "crop_size", settings.get("crop_size"), True)
        if edge is not None:
            raise HFFormatError(f"{file}: crop_size must give height and width, got {edge!r}")
    mean = std = None
    if settings.get("do_normalize"):
        mean = _per_channel(file, "image_mean", settings.get("image_mean"), channels)
        std = _per_channel(file, "image_std", settings.get("image_std"), channels)
    rescale = settings.get("rescale_factor") if settings.get("do_rescale") else None
    try:
        return ImagePreprocessing(
            size=size,
            shortest_edge=shortest_edge,
            crop_size=crop_size,
            resample=_resample(file, settings.get("resample")),
            rescale_factor=rescale,
            image_mean=mean,
            image_std=std,
        )
    except (TypeError, ValueError) as error:
        raise HFFormatError(f"{file}: {error}") from None


def _size(file: Path, name: str, value, square: bool):
    """(size (h, w) | None, shortest_edge | None) of a ``size`` / ``crop_size`` entry."""
    if isinstance(value, int) and not isinstance(value, bool):
        return ((value, value), None) if square else (None, value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (tuple(value), None)
    if isinstance(value, dict):
        if set(value) == {"height", "width"}:
            return (value["height"], value["width"]), None
        if set(value) == {"shortest_edge"}:
            return None, value["shortest_edge"]
    raise HFFormatError(
        f"{file}: {name} must be an int, {{'height', 'width'}} or {{'shortest_edge'}}; "
        f"got {value!r}"
    )


def _per_channel(file: Path, name: str, value, channels: int) -> tuple[float, ...]:
    values = [value] * channels if isinstance(value, (int, float)) else value
    if not isinstance(values, (list, tuple)) or len(values) != channels:
        raise HFFormatError(f"{file}: {name} must give {channels} values (one a channel)")
    return tuple(float(v) for v in values)


def _resample(file: Path, value) -> str:
    if isinstance(value, str) and value.lower() in _PIL_RESAMPLE.values():
        return value.lower()
    if isinstance(value, int) and value in _PIL_RESAMPLE:
        return _PIL_RESAMPLE[value]
    raise HFFormatError(
        f"{file}: resample={value!r} is not supported (0 nearest, 2 bilinear, 3 bicubic)"
    )
