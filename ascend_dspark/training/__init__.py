"""Draft training in DeepSpec's recipe: prompt sets, target regeneration, online/offline
target features, the three drafters' losses, the trainer (one GPU or torchrun DDP) and the
evaluation protocol."""
