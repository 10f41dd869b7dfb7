"""Lightning callbacks for RL runs, one concern per module; YAML configs name them ``callbacks.<Class>``."""

from callbacks.entropy import EntropyTracker
from callbacks.evaluation import Evaluation
from callbacks.length import LengthScaling
from callbacks.samples import SampleLogger
from callbacks.value_pretraining import ValuePretraining

__all__ = ["EntropyTracker", "Evaluation", "LengthScaling", "SampleLogger", "ValuePretraining"]
