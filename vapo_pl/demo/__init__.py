"""The embedded demo: an arithmetic task with written-out steps and a tiny base policy that RL can improve.

``task`` generates the problems (shipped as ``data/train.jsonl`` and ``data/heldout.jsonl``);
``base_policy.ensure_base_policy()`` builds, or finds in the cache, the model that ``make demo`` trains.
"""
