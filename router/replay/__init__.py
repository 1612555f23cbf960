"""`tiergate replay`: the lifecycle core on a virtual clock, against simulated engines, in one process."""
