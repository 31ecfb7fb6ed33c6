"""Keys of the detectron2-layout ResNet (``MODEL.BACKBONE.NAME build_resnet_backbone``), detectron2's names."""

from surgdino.config.core import declare as d

r = "MODEL.RESNETS."
d(r + "DEPTH", 50, "int", "ResNet depth: 50, 101 or 152 (bottleneck blocks 3-4-6-3, 3-4-23-3, 3-8-36-3).")
d(r + "OUT_FEATURES", ["res2", "res3", "res4", "res5"], "list[str]", "Stages returned (strides 4, 8, 16, 32).")
d(r + "NORM", "FrozenBN", "str", "Norm after every convolution: FrozenBN (ImageNet statistics, fixed), BN, SyncBN, "
  "GN (32 groups) or '' (none, convolutions get a bias).", choices=["FrozenBN", "BN", "SyncBN", "GN", ""])
d(r + "STRIDE_IN_1X1", True, "bool", "Stride-2 in the first 1x1 convolution of a stage (True: MSRA/Caffe layout, "
  "detectron2's default and its MSRA R-50.pkl) or in the 3x3 (False: torchvision's layout and weights, MaskDINO's R50).")
d(r + "NUM_GROUPS", 1, "int", "Groups of the 3x3 convolutions (ResNeXt: 32).")
d(r + "WIDTH_PER_GROUP", 64, "int", "Bottleneck width per group in res2 (doubles each stage; ResNeXt 32x4d: 4).")
d(r + "STEM_OUT_CHANNELS", 64, "int", "Channels of the 7x7 stem convolution.")
d(r + "RES2_OUT_CHANNELS", 256, "int", "Output channels of res2 (doubles each stage: 2048 at res5).")
d(r + "RES5_DILATION", 1, "int", "1, or 2 for a dilated res5 at stride 16.", choices=[1, 2])
d(r + "RES5_MULTI_GRID", [1, 1, 1], "list[int]", "Per-block multiplier of the res5 dilation (DeepLab; [1, 1, 1] = none).")
d(r + "STEM_TYPE", "basic", "str", "Stem: basic (7x7 conv, max pool) is the one built.", choices=["basic"])
