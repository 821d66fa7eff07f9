"""Training data: sources and their checks, where patches come from (sampler), one augmented
sample with its targets (samples, augment, targets), and batches from worker processes
(loader)."""
