"""Method recipes, one module per family, each a ``TrainingTask`` the engine trains.

- ``contrastive``: SimCLR / MoCo v2 on two views, with the kNN monitor.
- ``classifier``: the supervised CNN teacher.
- ``distillation``: the DeiT student, with the frozen teacher and the weights EMA as its state.
- ``detection``: DETR and Deformable DETR behind one registry.

A task takes validated params sections (``vitkit.config``) and tensors or
datasets, never file paths of the pipeline: it is usable from a notebook.
"""
