"""Lightning systems wrapping bare ``nn.Module``s, and the fit() the stages train through."""

from compress.lit.system import ClassificationSystem, CrossEntropyObjective, TaskObjective, TrainingDiverged

__all__ = ["ClassificationSystem", "CrossEntropyObjective", "TaskObjective", "TrainingDiverged"]
