"""The demo zoo: six small classifiers of scikit-learn's handwritten digits, trained by the
project, weights shipped inside the package (``neaudit/weights/demo-*.safetensors``).

Spec: ``demo:<name>`` (e.g. ``demo:patch_cnn``). ``neaudit zoo train-demo`` retrains them
reproducibly. Inputs are the digits as 32×32 RGB in [0, 1], normalized with mean 0.5 and
std 0.5.

* ``patch_cnn``, the authorized model: a 4×4/4 patch stem with 24 outputs on 48-dimensional
  patches, so its first layer has a 24-dimensional null space, like ResNet-50's 64×147 stem.
* ``small_cnn``: an overlapping 3×3 stride-1 stem.
* ``resnet``: timm ResNet (BasicBlock, one block per stage, widths 16–128).
* ``vit``: timm VisionTransformer with 4×4 patches.
* ``convmixer``: timm ConvMixer with 2×2 patches.
* ``mixer``: timm MLP-Mixer with 4×4 patches.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS = Path(__file__).parent / "weights"
SIZE = 32
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
AUTHORIZED = "demo:patch_cnn"


def _patch_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 24, 4, stride=4), nn.GELU(), nn.BatchNorm2d(24),
        nn.Conv2d(24, 64, 3, padding=1), nn.GELU(), nn.BatchNorm2d(64),
        nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10))


def _small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(64, 10))


def _resnet() -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, stem_width=16,
                  channels=(16, 32, 64, 128))


def _vit() -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=SIZE, patch_size=4, num_classes=10, embed_dim=64, depth=4,
                             num_heads=4, mlp_ratio=2.0)


def _convmixer() -> nn.Module:
    from timm.models.convmixer import ConvMixer

    return ConvMixer(dim=64, depth=4, kernel_size=5, patch_size=2, num_classes=10)


def _mixer() -> nn.Module:
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=10, img_size=SIZE, patch_size=4, num_blocks=4, embed_dim=64)


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "patch_cnn": _patch_cnn, "small_cnn": _small_cnn, "resnet": _resnet, "vit": _vit,
    "convmixer": _convmixer, "mixer": _mixer,
}
EPOCHS = {"patch_cnn": 30, "small_cnn": 30, "resnet": 30, "vit": 60, "convmixer": 30,
          "mixer": 60}


def weights_path(name: str, folder: Path = WEIGHTS) -> Path:
    return folder / f"demo-{name}.safetensors"


def digits(split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digit scans as (N, 32, 32, 3) uint8 and labels, split 70/30
    (stratified, fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.from_numpy(data.images / 16.0).float()[:, None]
    images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    images = torch.round(images.clamp(0, 1).expand(-1, 3, -1, -1) * 255).to(torch.uint8)
    images = images.permute(0, 2, 3, 1).numpy()
    train, test = train_test_split(np.arange(len(images)), test_size=0.3, random_state=seed,
                                   stratify=data.target)
    index = train if split == "train" else test
    return images[index], data.target[index].astype(np.int64)


def train(name: str, seed: int = 0, epochs: int | None = None,
          log: Callable[[str], None] = print) -> tuple[nn.Module, float]:
    """Train one demo model on the train split; returns it and its test accuracy."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    images, labels = digits("train", seed)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    y = torch.from_numpy(labels)
    net = ARCHITECTURES[name]()
    epochs = epochs or EPOCHS[name]
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * ((len(x) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for lo in range(0, len(x), 64):
            idx = order[lo:lo + 64]
            batch = _augment(x[idx], generator)
            loss = F.cross_entropy(net(batch), y[idx], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    net.eval()
    accuracy = evaluate(net)
    log(f"{name}: test accuracy {accuracy:.4f} after {epochs} epochs")
    return net, accuracy


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 2 pixels (reflected borders)."""
    dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=generator))
    padded = F.pad(batch, (2, 2, 2, 2), mode="replicate")
    return padded[..., 2 + dy: 2 + dy + SIZE, 2 + dx: 2 + dx + SIZE]


@torch.no_grad()
def evaluate(net: nn.Module, seed: int = 0) -> float:
    images, labels = digits("test", seed)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    return float((net(x).argmax(1).numpy() == labels).mean())


def build(name: str, weights: Path | None = None) -> nn.Module:
    """The named architecture with its shipped (or given) weights."""
    from safetensors.torch import load_file

    net = ARCHITECTURES[name]()
    net.load_state_dict(load_file(str(weights or weights_path(name))))
    return net.eval()


def train_all(out: Path = WEIGHTS, seed: int = 0, log: Callable[[str], None] = print
              ) -> dict[str, float]:
    """Retrain every demo model and save its weights (``neaudit zoo train-demo``)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    accuracies = {}
    for name in ARCHITECTURES:
        net, accuracies[name] = train(name, seed, log=log)
        state = {k: v.contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(weights_path(name, out)))
    return accuracies
