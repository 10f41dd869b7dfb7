"""A multi-turn environment by subclassing: find a hidden number from "higher"/"lower" replies.
Run: python examples/guess_number.py MODEL_DIR"""
import json
import random
import re
import sys
from pathlib import Path

import lightning.pytorch as pl

from vapo_pl import RolloutDataModule, VAPOModule
from vapo_pl.envs import Environment, StepResult


class GuessNumber(Environment):
    def reset(self, record, prompt):
        self.hidden = int(record.answer)
        return prompt

    def step(self, turn_ids, turn_text):
        guess = re.findall(r"\d+", turn_text)
        if not guess:
            return StepResult("\nsay a number\nA:", reward=-0.1)
        g = int(guess[-1])
        if g == self.hidden:
            return StepResult(None, reward=1.0, done=True)
        return StepResult(f"\n{'higher' if g < self.hidden else 'lower'}\nA:", reward=-0.1)


def main(model_dir: str, out_dir: str = "outputs/guess_number", max_steps: int = 20) -> pl.Trainer:
    rng = random.Random(0)
    data = Path(out_dir) / "train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"prompt": "guess 1-20", "answer": str(rng.randint(1, 20))}) + "\n"
                            for _ in range(256)))
    dm = RolloutDataModule(train_files=str(data), reward=[], environment=GuessNumber, max_response_length=64,
                           episode={"max_turns": 6, "max_turn_tokens": 4}, prompts_per_step=8,
                           samples_per_prompt=4, engine={"kind": "vllm", "dtype": "float32"})
    module = VAPOModule(model_path=model_dir, algorithm={"estimator": "grpo", "minibatch_size": 16})
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", default_root_dir=out_dir, logger=False)
    trainer.fit(module, dm)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1])
