"""Training (appendix 8.5): Adam with warm-up, gradient-norm clipping, the EMA of the
parameters, the release's learning-rate schedules, the loop, evaluation, keyed random numbers."""
