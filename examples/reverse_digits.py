"""A new task by subclassing VAPOModule: reverse a string of digits. Run: python examples/reverse_digits.py MODEL_DIR"""
import json
import random
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from vapo_pl import RolloutDataModule, VAPOModule
from vapo_pl.rewards import RewardOutput


class ReverseDigits(VAPOModule):
    def build_prompt(self, record, tokenizer, template):
        return f"reverse {record.prompt}:"  # plain text instead of the chat template

    def compute_reward(self, inputs, default):
        ok = torch.tensor([r.strip() == p[::-1] for r, p in zip(inputs.responses, inputs.prompts)])
        partial = torch.tensor([sum(a == b for a, b in zip(r, p[::-1])) / len(p)
                                for r, p in zip(inputs.responses, inputs.prompts)])
        score = ok.float() + 0.5 * partial  # exact match, plus dense credit per right position
        return RewardOutput(scores=score, correct=ok, terms={"exact": ok.float(), "partial": 0.5 * partial})


def main(model_dir: str, out_dir: str = "outputs/reverse_digits", max_steps: int = 20) -> pl.Trainer:
    rng = random.Random(0)
    data = Path(out_dir) / "train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"prompt": str(rng.randrange(10, 10**4))}) + "\n" for _ in range(256)))
    dm = RolloutDataModule(train_files=str(data), answer_key=None, max_response_length=8, prompts_per_step=8,
                           samples_per_prompt=4, engine={"kind": "vllm", "dtype": "float32"})
    module = ReverseDigits(model_path=model_dir, algorithm={"estimator": "grpo", "minibatch_size": 16})
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", default_root_dir=out_dir, logger=False)
    trainer.fit(module, dm)
    return trainer


if __name__ == "__main__":
    main(sys.argv[1])
