"""The training loop (Trainer), the TrainingTask contract, checkpoints, devices and DDP."""
