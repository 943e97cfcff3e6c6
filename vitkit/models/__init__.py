"""Model files that read top to bottom: ResNet, SimCLR / MoCo v2, the DeiT ViT, DETR, Deformable DETR."""
