"""Training: the classifier built on a backbone, the training loop, cached features and activations, class balance."""
