"""VisionEncoder: a ViT over packed image patches, MetaLM's bidirectional image encoder.

Images ``[I, C, H, W]`` become ``P = (H / p) ** 2`` patches each (raster
order, ``p`` the patch size), flattened to ``C * p * p`` values and embedded
by one Linear (the same map as a Conv2d with kernel and stride ``p``, without
the convolution machinery). A learned position embedding per patch is added,
then a pre-norm TransformerStack attends bidirectionally inside each image:
the patches of all images are packed (``[I * P, vision_dim]``) with
``cu_seqlens = arange(I + 1) * P`` and ``SpanMask.bidirectional``, so a batch
of any number of images is one span_attention call per layer, unpadded.

Why learned absolute positions rather than rotary: the image size is fixed
per model, so the table is small and fixed; it is what ViT-B/16 (CLIP, the
encoder MetaLM starts from) uses, so pretrained weights map onto it one to
one; 1-D rotary over raster order would misstate 2-D neighbourhoods; and with
no rotary the attention reads q, k and v as strided views of the fused qkv
projection, uncopied.
"""

from __future__ import annotations

import torch
from torch import nn

from metalm_fast.masks import SpanMask
from metalm_fast.models.transformer import TransformerStack
from metalm_fast.nn.architecture import BlockArchitecture

__all__ = ["VisionEncoder"]


class VisionEncoder(nn.Module):
    """ViT over packed patches: ``forward(images [I, C, S, S]) -> [I * P, vision_dim]``.

    Parameters
    ----------
    image_size : S (square images); a multiple of ``patch_size``.
    image_channels : C.
    patch_size : p; each image gives ``P = (S // p) ** 2`` rows, in raster order.
    dim, num_layers, num_heads : the transformer's width, depth and heads.
    mlp_kind : "gelu" or "swiglu".
    backend : span_attention backend.

    Rows ``i * P ... (i + 1) * P - 1`` of the output belong to image ``i``.
    ``I = 0`` gives ``[0, dim]``.
    """

    def __init__(
        self,
        image_size: int,
        image_channels: int,
        patch_size: int,
        dim: int,
        num_layers: int,
        num_heads: int,
        *,
        mlp_kind: str = "gelu",
        backend: str = "auto",
    ):
        super().__init__()
        sizes = {
            "image_size": image_size,
            "image_channels": image_channels,
            "patch_size": patch_size,
            "dim": dim,
            "num_layers": num_layers,
            "num_heads": num_heads,
        }
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if image_size % patch_size:
            raise ValueError(
                f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})"
            )
        self.image_size, self.image_channels = image_size, image_channels
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.dim = dim
        self.patch_embedding = nn.Linear(image_channels * patch_size * patch_size, dim)
        self.position_embedding = nn.Parameter(torch.randn(self.num_patches, dim) * 0.02)
        self.transformer = TransformerStack(
            dim,
            num_layers,
            num_heads,
            architecture=BlockArchitecture(positions="none", mlp_kind=mlp_kind),
            backend=backend,
        )

    @classmethod
    def from_config(cls, config) -> VisionEncoder:
        """The encoder a MetaLMConfig describes (its ``image_*``, ``patch_size``, ``vision_*``)."""
        return cls(
            config.image_size,
            config.image_channels,
            config.patch_size,
            config.vision_dim,
            config.vision_layers,
            config.vision_heads,
            mlp_kind=config.mlp_kind,
            backend=config.backend,
        )

    def check_images(self, images: torch.Tensor) -> None:
        """Raise (naming ``images``) unless it is a float [I, C, S, S] tensor as configured."""
        expected = (self.image_channels, self.image_size, self.image_size)
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a tensor [I, C, H, W], got {type(images).__name__}")
        if not images.dtype.is_floating_point:
            raise TypeError(f"images must be a floating tensor, got dtype {images.dtype}")
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(
                f"images must be [I, C, H, W] = [I, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(image_channels, image_size, image_size of the config), got shape "
                f"{tuple(images.shape)}"
            )

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[I, C, S, S] -> [I * P, C * p * p]: raster-order patches, each flattened (C, py, px)."""
        count, channels = images.shape[0], self.image_channels
        side, patch = self.image_size // self.patch_size, self.patch_size
        grid = images.reshape(count, channels, side, patch, side, patch)
        return grid.permute(0, 2, 4, 1, 3, 5).reshape(count * side * side, channels * patch * patch)

    def cu_seqlens(self, num_images: int, device) -> torch.Tensor:
        """int64 [I + 1]: image ``i`` holds packed rows ``[i * P, (i + 1) * P)``."""
        return torch.arange(num_images + 1, device=device) * self.num_patches

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        count = images.shape[0]
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(
            self.patchify(images.to(device=weight.device, dtype=weight.dtype))
        )
        hidden = patches.view(count, self.num_patches, self.dim) + self.position_embedding
        hidden = hidden.view(count * self.num_patches, self.dim)
        mask = SpanMask.bidirectional(self.cu_seqlens(count, hidden.device))
        return self.transformer(hidden, mask)
