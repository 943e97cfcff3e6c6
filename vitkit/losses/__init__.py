"""Loss functions of the methods: contrastive (NT-Xent, InfoNCE) and DeiT distillation."""
