"""Runtime: applies a PruningPlan to a model through instance-local hooks."""
