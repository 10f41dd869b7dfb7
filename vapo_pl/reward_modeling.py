"""Reward-model training on preference pairs (Bradley-Terry), Lightning-native: ``vapo-pl-rm fit --config ...``.

``RewardModelModule`` puts a one-output sequence-classification head on a Hugging Face backbone and minimises

    -log sigmoid(r(x, y_chosen) - r(x, y_rejected) - margin)  [+ center_coef * (r_chosen + r_rejected)^2]

(Bradley-Terry as in InstructGPT, Ouyang et al. 2022, eq. 1; the optional margin per pair as in Llama 2, Touvron
et al. 2023, eq. 2; the optional centering term keeps rewards near zero, Eisenstein et al. 2023). Validation logs
the pairwise accuracy (``r_chosen > r_rejected``) and the mean margin ``r_chosen - r_rejected``. The trained
model is written with ``save_pretrained`` (and the tokenizer), so it loads with
``AutoModelForSequenceClassification`` and plugs in unchanged as ``data.reward: [{name: reward_model, kwargs:
{path: ...}}]`` and as ``model.critic_init: reward_model`` with ``model.critic_path``.

``PreferenceDataModule`` reads jsonl / parquet / ``save_to_disk`` rows with ``prompt``, ``chosen``, ``rejected``
(and optionally ``margin``), renders each side as the conversation the ``reward_model`` reward will score
(``vapo_pl.prompts.render_conversation``), and drops pairs longer than ``max_length`` tokens (counted).
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader

from vapo_pl.common import require_model_dir
from vapo_pl.prompts import DataError, _read_rows, render_conversation

log = logging.getLogger(__name__)


class PreferenceDataModule(pl.LightningDataModule):
    """Preference pairs for reward-model training.

    Args:
        train_files / val_files: jsonl / parquet files or ``save_to_disk`` directories of pairs.
        model_path: the tokenizer's directory (the reward model's backbone).
        prompt_key, chosen_key, rejected_key: row fields.
        margin_key: optional row field with a per-pair margin (0 where absent).
        template: ``"chat"`` (the tokenizer's chat template, a user and an assistant turn) or a format string with
            ``{prompt}`` that the response is appended to.
        max_length: pairs whose chosen or rejected side is longer (in tokens) are dropped and counted.
        batch_size: pairs per optimizer step.
        seed: shuffling seed.
    """

    def __init__(self, train_files: str | list[str], val_files: str | list[str] | None = None,
                 model_path: str | None = None, prompt_key: str = "prompt", chosen_key: str = "chosen",
                 rejected_key: str = "rejected", margin_key: str | None = None, template: str = "chat",
                 max_length: int = 1024, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(f"data.max_length must be >= 2, got {max_length}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if template != "chat" and "{prompt}" not in template:
            raise ValueError(f"data.template must be 'chat' or contain '{{prompt}}', got {template!r}")
        self.train_files, self.val_files, self.model_path = train_files, val_files, model_path
        self.keys = (prompt_key, chosen_key, rejected_key)
        self.margin_key = margin_key
        self.template, self.max_length, self.batch_size, self.seed = template, max_length, batch_size, seed
        self.train_pairs: list[tuple[list[int], list[int], float]] = []
        self.val_pairs: list[tuple[list[int], list[int], float]] = []
        self.dropped_pairs = 0
        self.tokenizer = None

    def _pairs(self, files: str | list[str]) -> list[tuple[list[int], list[int], float]]:
        tok = self.tokenizer
        out = []
        for f in [files] if isinstance(files, str) else files:
            path = Path(f)
            if not path.exists():
                raise DataError(f"preference file {path} does not exist")
            for loc, row in _read_rows(path):
                texts = []
                for key in self.keys:
                    value = row.get(key)
                    if not isinstance(value, str) or not value.strip():
                        raise DataError(f"{loc}: missing or empty field {key!r}")
                    texts.append(value)
                margin = float(row.get(self.margin_key, 0.0) or 0.0) if self.margin_key else 0.0
                prompt, chosen, rejected = texts
                ids = [tok(render_conversation(tok, prompt, r, self.template), add_special_tokens=False)["input_ids"]
                       for r in (chosen, rejected)]
                if max(len(i) for i in ids) > self.max_length:
                    self.dropped_pairs += 1
                    continue
                out.append((ids[0], ids[1], margin))
        if not out:
            raise DataError(f"no usable preference pairs in {files} (dropped as too long: {self.dropped_pairs})")
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            if self.model_path is None and self.trainer is not None:
                self.model_path = getattr(self.trainer.lightning_module, "model_path", None)
            self.tokenizer = AutoTokenizer.from_pretrained(require_model_dir(self.model_path, "data.model_path"))
        if stage in (None, "fit") and not self.train_pairs:
            self.train_pairs = self._pairs(self.train_files)
        if self.val_files and not self.val_pairs:
            self.val_pairs = self._pairs(self.val_files)
        if self.dropped_pairs:
            log.warning("dropped %d preference pairs longer than max_length=%d", self.dropped_pairs, self.max_length)

    def _collate(self, pairs: list[tuple[list[int], list[int], float]]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out: dict[str, torch.Tensor] = {}
        for side, k in (("chosen", 0), ("rejected", 1)):
            seqs = [torch.tensor(p[k]) for p in pairs]
            ids = pad_sequence(seqs, batch_first=True, padding_value=pad)
            out[f"{side}_ids"] = ids
            out[f"{side}_mask"] = (torch.arange(ids.shape[1])[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).long()
        out["margin"] = torch.tensor([p[2] for p in pairs], dtype=torch.float32)
        return out

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_pairs, batch_size=self.batch_size, shuffle=True, generator=g,
                          collate_fn=self._collate)

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_pairs:
            return []
        return DataLoader(self.val_pairs, batch_size=self.batch_size, collate_fn=self._collate)


class RewardModelModule(pl.LightningModule):
    """A Bradley-Terry reward model on a Hugging Face backbone.

    Args:
        model_path: the backbone (a causal LM or a sequence-classification checkpoint; the one-output head is new
            unless the checkpoint has one).
        lr, weight_decay: AdamW.
        center_coef: weight of the centering term ``mean((r_chosen + r_rejected)^2)`` (0 = off).
        save_dir: where the trained model and tokenizer are written when training ends.
    """

    def __init__(self, model_path: str, lr: float = 1e-5, weight_decay: float = 0.0, center_coef: float = 0.0,
                 save_dir: str | None = None) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"model.lr must be > 0, got {lr}")
        if center_coef < 0 or weight_decay < 0:
            raise ValueError("model.center_coef and model.weight_decay must be >= 0")
        self.model_path, self.lr, self.weight_decay = model_path, lr, weight_decay
        self.center_coef, self.save_dir = center_coef, save_dir
        self.save_hyperparameters()
        self.model = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = require_model_dir(self.model_path, "model.model_path")
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path)
        # the classifier reads the last token that is not padding: it must know the pad id the data uses
        self.model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def rewards(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).logits[:, 0].float()

    def _pair_terms(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r_c = self.rewards(batch["chosen_ids"], batch["chosen_mask"])
        r_r = self.rewards(batch["rejected_ids"], batch["rejected_mask"])
        return r_c, r_r, batch["margin"].to(r_c.device)

    def loss(self, r_c: torch.Tensor, r_r: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        loss = -F.logsigmoid(r_c - r_r - margin).mean()
        if self.center_coef > 0:
            loss = loss + self.center_coef * ((r_c + r_r) ** 2).mean()
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        r_c, r_r, margin = self._pair_terms(batch)
        loss = self.loss(r_c, r_r, margin)
        n = len(r_c)
        self.log_dict({"rm/loss": loss, "rm/accuracy": (r_c > r_r).float().mean(), "rm/margin": (r_c - r_r).mean()},
                      on_step=True, on_epoch=False, batch_size=n, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        r_c, r_r, margin = self._pair_terms(batch)
        n = len(r_c)
        self.log_dict({"rm_val/loss": self.loss(r_c, r_r, margin), "rm_val/accuracy": (r_c > r_r).float().mean(),
                       "rm_val/margin": (r_c - r_r).mean()}, on_step=False, on_epoch=True, batch_size=n,
                      sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        m = self.trainer.callback_metrics
        if self.trainer.is_global_zero and not self.trainer.sanity_checking and "rm_val/accuracy" in m:
            n = len(getattr(self.trainer.datamodule, "val_pairs", []))
            print(f"reward model held-out pairwise accuracy {float(m['rm_val/accuracy']):.3f}, mean margin "
                  f"{float(m['rm_val/margin']):.3f} ({n} pairs, step {self.global_step})", flush=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def on_train_end(self) -> None:
        if self.save_dir and self.trainer.is_global_zero:
            from transformers import AutoTokenizer

            self.model.save_pretrained(self.save_dir)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(self.save_dir)
            print(f"reward model saved to {self.save_dir}", flush=True)


def main(args: list[str] | None = None) -> int:
    """``vapo-pl-rm``: LightningCLI for reward-model training (``vapo-pl-rm fit --config configs/rm_demo.yaml``)."""
    from lightning.pytorch.cli import LightningCLI

    from vapo_pl.cli import _OneLineParser

    LightningCLI(RewardModelModule, PreferenceDataModule, subclass_mode_model=True, subclass_mode_data=True,
                 parser_class=_OneLineParser,
                 save_config_kwargs={"overwrite": True}, args=args)
    return 0


if __name__ == "__main__":  # python -m vapo_pl.reward_modeling: run the package's module, not this __main__ copy
    import sys

    from vapo_pl import reward_modeling  # noqa: PLW0406  (the package module, not this __main__ copy)

    sys.exit(reward_modeling.main(sys.argv[1:]))
