"""Plain-PyTorch copy of torchvision's r3d_18 (VideoResNet + BasicBlock + Conv3DSimple + BasicStem).

Same module structure, so `state_dict()` keys equal torchvision's (stem.0, layerI.J.conv1.0, ..., fc); used
for parity tests and `--compare-torch` benchmarks. torch is imported inside functions only, so importing this
module never needs torch (torchvision itself is not required at all).
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np


@functools.lru_cache(maxsize=None)
def _classes():
  import torch
  from torch import nn

  class Conv3DSimple(nn.Conv3d):

    def __init__(self, in_planes, out_planes, stride=1, padding=1):
      super().__init__(in_planes, out_planes, kernel_size=(3, 3, 3), stride=stride, padding=padding,
                       bias=False)

  class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = nn.Sequential(Conv3DSimple(inplanes, planes, stride), nn.BatchNorm3d(planes),
                                 nn.ReLU(inplace=True))
      self.conv2 = nn.Sequential(Conv3DSimple(planes, planes), nn.BatchNorm3d(planes))
      self.relu = nn.ReLU(inplace=True)
      self.downsample = downsample
      self.stride = stride

    def forward(self, x):
      residual = x
      out = self.conv2(self.conv1(x))
      if self.downsample is not None:
        residual = self.downsample(x)
      return self.relu(out + residual)

  class BasicStem(nn.Sequential):

    def __init__(self, in_channels=3, width=64):
      super().__init__(
          nn.Conv3d(in_channels, width, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3),
                    bias=False),
          nn.BatchNorm3d(width), nn.ReLU(inplace=True))

  class VideoResNet(nn.Module):

    def __init__(self, width=64, stage_depths=(2, 2, 2, 2), in_channels=3, num_classes=400):
      super().__init__()
      self.inplanes = width
      self.stem = BasicStem(in_channels, width)
      for stage, depth in enumerate(stage_depths):
        setattr(self, f'layer{stage + 1}',
                self._make_layer(width * 2 ** stage, depth, stride=1 if stage == 0 else 2))
      self.num_stages = len(stage_depths)
      self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
      self.fc = nn.Linear(self.inplanes, num_classes)
      for m in self.modules():  # torchvision's init
        if isinstance(m, nn.Conv3d):
          nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(m, nn.BatchNorm3d):
          nn.init.constant_(m.weight, 1)
          nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
          nn.init.normal_(m.weight, 0, 0.01)
          nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes, blocks, stride):
      downsample = None
      if stride != 1 or self.inplanes != planes:
        downsample = nn.Sequential(
            nn.Conv3d(self.inplanes, planes, kernel_size=1, stride=(stride,) * 3, bias=False),
            nn.BatchNorm3d(planes))
      layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
      self.inplanes = planes
      layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
      return nn.Sequential(*layers)

    def features(self, x):
      """(B,C,T,H,W) → pooled (B, 8·width) features (the encoder without fc)."""
      x = self.stem(x)
      for stage in range(self.num_stages):
        x = getattr(self, f'layer{stage + 1}')(x)
      return self.avgpool(x).flatten(1)

    def forward(self, x):
      return self.fc(self.features(x))

  return torch, VideoResNet


def make_torch_r3d18(width: int = 64, in_channels: int = 3, num_classes: int = 400,
                     stage_depths: Sequence[int] = (2, 2, 2, 2)):
  """torchvision.models.video.r3d_18 (random init) rebuilt without torchvision, width/depth adjustable."""
  _, video_resnet = _classes()
  return video_resnet(width, tuple(stage_depths), in_channels, num_classes)


def randomize_batchnorm(model, seed: int = 0) -> None:
  """Random BN weight/bias/running stats, so parity tests exercise every BN term (not just 1/0 init)."""
  torch, _ = _classes()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm3d):
        n = module.num_features
        module.weight.copy_(1.0 + 0.2 * torch.randn(n, generator=generator))
        module.bias.copy_(0.1 * torch.randn(n, generator=generator))
        module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
        module.running_var.copy_(0.5 + torch.rand(n, generator=generator))


def state_dict_numpy(model) -> dict[str, np.ndarray]:
  return {key: value.detach().cpu().numpy().copy() for key, value in model.state_dict().items()}


def torch_features(model, video_bthwc: np.ndarray, train: bool = False) -> np.ndarray:
  """Run `model.features` on a channels-last numpy video; returns numpy (B, F)."""
  torch, _ = _classes()
  model.train(train)
  x = torch.from_numpy(np.ascontiguousarray(np.asarray(video_bthwc, np.float32).transpose(0, 4, 1, 2, 3)))
  with torch.set_grad_enabled(False):
    return model.features(x).numpy()
