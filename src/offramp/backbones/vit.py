"""ViT (HF ``ViTModel``): early exits on an image encoder, to show the exits are not tied to text.

Images travel through the encoder interface as a (b, C*H*W) float tensor in the place of
``input_ids`` (``flatten_images``), so the engine, the policies, traces and calibration are
unchanged; images have no padding, so the attention mask is ignored. Exits read the CLS token
through ViT's final layer norm (and its pooler when it has one), so the last exit with the default
head (``pooling="cls"``, ``use_pooler=True``) is the plain ViT's pooled output.

```python
from offramp.backbones.vit import flatten_images
model = EarlyExitModel.from_backbone(ViTModel(cfg), OfframpConfig(num_labels=10, **jei_config(0.1)))
model.predict(flatten_images(pixel_values), None, "gate")
```
"""

from __future__ import annotations

from torch import Tensor, nn

from offramp.backbones.base import EncoderAdapter, LayerContext


def flatten_images(pixel_values: Tensor) -> Tensor:  # (b, C, H, W) -> (b, C*H*W)
    """Images as the 2-D tensor the encoder interface carries in place of token ids."""
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}")
    return pixel_values.reshape(pixel_values.shape[0], -1)


class _NormPool(nn.Module):
    """ViT's final layer norm, then its pooler (or the CLS token): (b, t, d) -> (b, d)."""

    def __init__(self, norm: nn.Module, pooler: nn.Module | None) -> None:
        super().__init__()
        self.norm, self.pool = norm, pooler

    def forward(self, hidden: Tensor) -> Tensor:
        h = self.norm(hidden)
        return self.pool(h) if self.pool is not None else h[:, 0]


class ViTAdapter(EncoderAdapter):
    model_types = ("vit",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self._pool = _NormPool(model.layernorm, getattr(model, "pooler", None))

    def _layers(self) -> nn.ModuleList:
        layers = getattr(self.model, "layers", None)  # transformers 5.x
        return layers if layers is not None else self.model.encoder.layer

    def layer_module(self, i: int) -> nn.Module:
        return self._layers()[i]

    def embed(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:  # (b, t, d)
        c, s = self.config.num_channels, self.config.image_size
        pixels = input_ids
        if pixels.dim() == 2:
            if pixels.shape[1] != c * s * s:
                raise ValueError(f"flattened images must have {c}*{s}*{s} = {c * s * s} values per row, "
                                 f"got {pixels.shape[1]}: pass flatten_images(pixel_values)")
            pixels = pixels.reshape(-1, c, s, s)
        dtype = self.model.embeddings.patch_embeddings.projection.weight.dtype
        return self.model.embeddings(pixels.to(dtype))

    def context(self, hidden: Tensor, attention_mask: Tensor) -> LayerContext:
        return {"mask": None}  # every patch attends to every patch

    def pooler(self) -> nn.Module | None:
        return self._pool
