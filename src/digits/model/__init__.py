"""The network: numpy inference, the torch MLP, augmentation, checkpoints, calibration, refusal."""
