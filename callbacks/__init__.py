"""Lightning callbacks for RL runs, one concern per module; YAML configs name them ``vapo_pl.callbacks.<Class>``."""

from vapo_pl.callbacks.entropy import EntropyTracker
from vapo_pl.callbacks.evaluation import Evaluation
from vapo_pl.callbacks.export import ExportActor
from vapo_pl.callbacks.length import LengthScaling
from vapo_pl.callbacks.samples import SampleLogger
from vapo_pl.callbacks.value_pretraining import ValuePretraining

__all__ = ["EntropyTracker", "Evaluation", "ExportActor", "LengthScaling", "SampleLogger", "ValuePretraining"]
