"""Module subclasses for the fault tests."""

from vapo_pl import VAPOModule


class LongPrompts(VAPOModule):
    """Pads every prompt past any sensible max_prompt_length: only the DataModule's setup can see it."""

    def build_prompt(self, record, tokenizer, template):
        return "x" * 200 + record.prompt


class NaNRewards(VAPOModule):
    """``token_rewards`` returns NaN on one token from RL step ``nan_from_step`` (1-based) on."""

    def __init__(self, *args, nan_from_step: int = 3, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_from_step = nan_from_step

    def token_rewards(self, batch):
        rewards = super().token_rewards(batch)
        if self.rl_step + 1 >= self.nan_from_step:
            rewards[0, 0] = float("nan")
        return rewards


class BrokenActor(VAPOModule):
    """Fails to build its actor with a ValueError: after the log directory exists (Lightning writes the run's
    config there when callbacks set up), before training starts."""

    def build_actor(self):
        raise ValueError("model.model_path: this actor cannot be built (test)")
