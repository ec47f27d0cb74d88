"""The MoE transformer: takes a ParallelState, never reads globals."""
