"""Lightning data modules, one module per family: :mod:`.base` (the interface they share), :mod:`.images`,
:mod:`.photos`, :mod:`.signals`, :mod:`.toy`."""

from .base import FEATURE_SPACES, MODALITIES, DataSpec, EpochShuffle
from .images import CIFAR10Data, DigitsData, ImageFolderData
from .photos import PhotoPatches
from .signals import MNIST1DData
from .toy import TOY_KINDS, GMMData, Toy2DData

__all__ = ["DigitsData", "Toy2DData", "GMMData", "ImageFolderData", "CIFAR10Data", "PhotoPatches", "MNIST1DData",
           "DATAMODULES", "TOY_KINDS",
           "EpochShuffle", "DataSpec", "MODALITIES", "FEATURE_SPACES"]

DATAMODULES = {
    "digits": DigitsData,
    "toy2d": Toy2DData,
    "gmm": GMMData,
    "imagefolder": ImageFolderData,
    "cifar10": CIFAR10Data,
    "mnist1d": MNIST1DData,
    "photo_patches": PhotoPatches,
}
