"""What a run does around the math: checkpoints (written atomically), the run folder
(resume, signals, the lock), option ranges, and data parallelism behind a communicator."""
