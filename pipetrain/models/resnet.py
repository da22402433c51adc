"""torchvision ResNets rearranged so that their top-level children run in order.

torchvision's ``ResNet.forward`` flattens inline with ``torch.flatten``; here that step is a
``nn.Flatten(1)`` child named ``flatten`` placed between ``avgpool`` and ``fc``, so the units are
``conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4, avgpool, flatten, fc``. Module names are
unchanged, so state dicts are interchangeable with torchvision's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from torchvision import models as tvm

__all__ = ["UnitResNet", "resnet18", "resnet50"]

_ORDER = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")


class UnitResNet(nn.Module):
    """A torchvision ``ResNet`` whose children are registered in execution order with an explicit flatten.

    The submodules of ``base`` are taken over as they are (no copies), so weights and initialisation are
    those of ``base`` and ``state_dict()`` keys are identical to ``base.state_dict()`` keys.
    """

    def __init__(self, base: tvm.ResNet) -> None:
        super().__init__()
        for name in _ORDER:
            self.add_module(name, getattr(base, name))
        self.flatten = nn.Flatten(1)
        self.fc = base.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a ``(B, 3, H, W)`` image batch to ``(B, num_classes)`` logits."""
        for module in self.children():
            x = module(x)
        return x


def resnet18(num_classes: int = 10) -> nn.Module:
    """Build a randomly initialised ResNet-18 (torchvision, ``weights=None``) as a :class:`UnitResNet`."""
    from torchvision.models import resnet18 as torchvision_resnet18  # 1.5 s to import: only when used

    return UnitResNet(torchvision_resnet18(weights=None, num_classes=num_classes))


def resnet50(num_classes: int = 10) -> nn.Module:
    """Build a randomly initialised ResNet-50 (torchvision, ``weights=None``) as a :class:`UnitResNet`."""
    from torchvision.models import resnet50 as torchvision_resnet50

    return UnitResNet(torchvision_resnet50(weights=None, num_classes=num_classes))
