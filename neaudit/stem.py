"""Find the first linear operator a model applies to the pixels, by tracing execution.

``first_layer(model)`` starts one forward pass with hooks on every ``Conv2d`` and ``Linear``,
records the first one to fire and stops the pass there (the rest of the network would cost
a whole forward: 0.18 s for ViT-B/16 on 2 cores, paid by ``protect`` and by every model of
an audit's evidence). It then checks that this layer's input is exactly the normalized image,
so that the returned weight, stride, padding and normalization describe the map from
[0, 1] pixels to first-layer responses.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from neaudit.errors import ModelSpecError
from neaudit.models import ImageClassifier
from neaudit.seeding import generator

_STEM_FIX = ("Fix: authorize a model whose first layer is a plain Conv2d or a patch embedding "
             "(timm's CNNs and ViTs have one).")


@dataclass(frozen=True)
class FirstLayer:
    """The pixel-facing linear map of a model.

    ``weight`` acts on normalized input x̃ = (x − mean) / std; :attr:`pixel_weight` folds the
    normalization in, so that ``response(δ)`` is the first-layer change caused by a pixel
    perturbation δ (the bias and mean cancel for differences).
    """

    weight: torch.Tensor  # (m, C, kh, kw)
    stride: tuple[int, int]
    padding: tuple[int, int]
    mean: torch.Tensor  # (C,)
    std: torch.Tensor  # (C,)
    module_name: str

    @property
    def kernel(self) -> tuple[int, int]:
        return tuple(self.weight.shape[-2:])

    @property
    def overlapping(self) -> bool:
        return any(s < k for s, k in zip(self.stride, self.kernel, strict=True)) or any(
            p > 0 for p in self.padding)

    @property
    def unfolded(self) -> torch.Tensor:
        """W as an (m, C·kh·kw) matrix on normalized patches."""
        return self.weight.reshape(self.weight.shape[0], -1)

    @functools.cached_property
    def unfolded_svd(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Singular values and all right singular vectors of :attr:`unfolded`, in float64:
        computed once per layer (110 ms for ViT-B/16 on 2 cores, and the published
        construction needs them for every batch it recodes)."""
        _, s, vh = torch.linalg.svd(self.unfolded.double(), full_matrices=True)
        return s, vh

    @property
    def pixel_weight(self) -> torch.Tensor:
        return self.weight / self.std.view(1, -1, 1, 1)

    def response(self, delta: torch.Tensor) -> torch.Tensor:
        """First-layer change W̃δ for pixel perturbations δ (NCHW)."""
        return F.conv2d(delta, self.pixel_weight.to(delta), stride=self.stride,
                        padding=self.padding)


class _Found(Exception):
    """Raised by the tracing hook once it has seen the first layer: the pass stops there."""


def first_layer(model: ImageClassifier, image_size: tuple[int, int] | None = None) -> FirstLayer:
    """Trace ``model`` up to its first pixel-facing layer and return that convolution."""
    size = model.input_size or image_size or (64, 64)
    seen: list[tuple[str, nn.Module, torch.Tensor]] = []
    names = {module: name for name, module in model.net.named_modules()}

    def hook(module: nn.Module, inputs: tuple) -> None:
        if not seen:  # a network that catches the stop runs on, and is traced all the same
            seen.append((names[module], module, inputs[0].detach()))
            raise _Found

    handles = [m.register_forward_pre_hook(hook) for m in model.net.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    images = torch.rand(1, 3, *size, generator=generator("stem-probe")).to(model.mean.device)
    try:
        with torch.no_grad(), contextlib.suppress(_Found):  # the hook's stop: the layer is seen
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise ModelSpecError(f"{model.name}: no Conv2d or Linear layer runs in the forward pass. "
                             f"{_STEM_FIX}")
    name, module, seen_input = seen[0]
    if not isinstance(module, nn.Conv2d) or "Same" in type(module).__name__:
        raise ModelSpecError(
            f"{model.name}: the first pixel-facing layer '{name}' is a {type(module).__name__}; "
            f"neaudit supports a plain Conv2d stem or patch embedding. {_STEM_FIX}")
    if module.groups != 1 or module.dilation not in ((1, 1), 1) or module.padding_mode != "zeros":
        raise ModelSpecError(f"{model.name}: stem '{name}' uses groups, dilation or non-zero "
                             f"padding, which neaudit does not model. {_STEM_FIX}")
    expected = model.preprocess(images)
    if seen_input.shape != expected.shape or not torch.allclose(seen_input, expected, atol=1e-5):
        raise ModelSpecError(
            f"{model.name}: stem '{name}' does not see the normalized pixels directly (the "
            "network transforms the input first). Fix: move that transform into the "
            "wrapper's preprocessing.")
    padding = module.padding
    if isinstance(padding, str):
        padding = (0, 0) if padding == "valid" else tuple(k // 2 for k in module.kernel_size)
    return FirstLayer(  # small, so always on the CPU, wherever the model runs
        weight=module.weight.detach().float().cpu().clone(),
        stride=tuple(module.stride),
        padding=tuple(padding),
        mean=model.mean.flatten().detach().cpu().clone(),
        std=model.std.flatten().detach().cpu().clone(),
        module_name=name,
    )
