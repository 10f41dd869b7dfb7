"""What a healthy ``vapo-pl`` run does not print: the one catalogue of third-party messages the CLI filters.

Each entry is matched exactly (the start of the message, or a regular expression for Python warnings), so any other
message, and every error, still reaches the user. Noise that could be removed where it starts is removed there
instead (the critic is built in train mode, so Lightning has no eval-mode modules to report; the packaging banner is
gone from ``pyproject.toml``). ``VAPO_PL_VERBOSE=1`` (or ``vapo-pl --verbose ...``) turns all filtering off.

- vLLM: its loggers at WARNING and above (its INFO start-up lines are dropped), minus ``VLLM_MESSAGES``, through a
  logging config file vLLM reads at import (``VLLM_LOGGING_CONFIG_PATH``), so messages logged while vLLM imports are
  covered too. A user's own ``VLLM_LOGGING_CONFIG_PATH`` or ``VLLM_LOGGING_LEVEL`` is left alone.
- Python warnings matching ``PYTHON_WARNINGS`` (Lightning's notes about this project's deliberate choices, a vLLM
  deprecation);
- Lightning's start-up INFO lines in ``LIGHTNING_INFO``;
- transformers' load report when the only key it reports is the output head a value model does not have
  (``lm_head.weight | UNEXPECTED``: the critic's backbone is loaded from a causal-LM checkpoint);
- progress bars of transformers' weight loading.

The project's own warnings are one line (``warning: ...``) without a source path.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path

VERBOSE_ENV = "VAPO_PL_VERBOSE"
_installed = False  # the filters below are process-wide: installed once

VLLM_MESSAGES = (
    "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding",
    "libtcmalloc is not found in LD_PRELOAD",
    "libiomp is not found in LD_PRELOAD",
    "Triton is not installed. triton-cpu is expected",
    "Triton is installed, but doesn't include CPU backend",
    "Model Runner V2 requires Triton",
    "Inductor compilation was disabled by user settings",
    "Enforce eager set, disabling torch.compile",
    "This model does not officially support disabling chunked prefill",  # off on CPU on purpose (EngineConfig)
    "The global random seed is set to",  # the engine keeps the trainer's RNG stream (vllm_engine)
)
PYTHON_WARNINGS = (
    r"`torch\.distributed\.reduce_op` is deprecated",
    r"Found \d+ module\(s\) in eval mode at the start of training",  # a reference model is in eval mode on purpose
    r"Total length of `list` across ranks is zero",  # no validation dataloader: evaluation is a callback
    r"You are using the `dataloader_iter` step flavor",  # on purpose: each step pulls its own rollout
    r"Found `dataloader_iter` argument in the `training_step`",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
LIGHTNING_INFO = (
    "💡 Tip: For seamless cloud logging",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "Seed set to",
    "You are using a CUDA device",
    "`Trainer.fit` stopped: `max_steps=",  # the run's own summary follows
)


_RANK_PREFIX = re.compile(r"^\[rank: \d+\] ")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...] = VLLM_MESSAGES) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that cannot format is shown as it is
            return True
        return not _RANK_PREFIX.sub("", message.lstrip()).startswith(self.prefixes)


class DropOutputHeadReport(logging.Filter):
    """Drops transformers' load report when every key it lists is ``lm_head.weight``, unexpected."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        if "LOAD REPORT" not in message:
            return True
        rows = [line for line in message.splitlines() if "|" in line and not set(line) <= set("-+| ")]
        keys = [r.split("|")[0].strip() for r in rows if r.split("|")[0].strip() not in ("Key", "")]
        statuses = {r.split("|")[1].strip() for r in rows if len(r.split("|")) > 1 and r.split("|")[0].strip() != "Key"}
        return not (keys == ["lm_head.weight"] and statuses == {"UNEXPECTED"})


def _vllm_logging_config() -> Path:
    """A logging config for vLLM: its format, WARNING and above, through ``DropMessages`` (written once per user)."""
    fmt = "(%(processName)s pid=%(process)d) %(levelname)s %(asctime)s [%(fileinfo)s:%(lineno)d] %(message)s"
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"vapo_quiet": {"()": "vapo_pl.quiet.DropMessages"}},
        "formatters": {"vllm": {"()": "vllm.logging_utils.NewLineFormatter", "datefmt": "%m-%d %H:%M:%S",
                                "format": fmt}},
        "handlers": {"vllm": {"class": "logging.StreamHandler", "formatter": "vllm", "level": "WARNING",
                              "stream": "ext://sys.stdout", "filters": ["vapo_quiet"]}},
        "loggers": {"vllm": {"handlers": ["vllm"], "level": "WARNING", "propagate": False}},
    }
    text = json.dumps(config, indent=1, sort_keys=True)
    path = Path(tempfile.gettempdir()) / f"vapo_pl_vllm_logging_{os.getuid()}.json"
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def install() -> None:
    """Filter the catalogue (unless ``VAPO_PL_VERBOSE``). Call before vLLM, Lightning or transformers log anything:
    the CLI calls it first thing."""
    global _installed
    logging.getLogger("vapo_pl").addHandler(_project_handler())
    if verbose() or _installed:
        return
    _installed = True
    if "VLLM_LOGGING_CONFIG_PATH" not in os.environ and "VLLM_LOGGING_LEVEL" not in os.environ:
        os.environ["VLLM_LOGGING_CONFIG_PATH"] = str(_vllm_logging_config())
    if logging.lastResort is not None:  # vLLM logs some of them while it imports, before its own handler exists
        logging.lastResort.addFilter(DropMessages())
    for pattern in PYTHON_WARNINGS:
        warnings.filterwarnings("ignore", message=f".*{pattern}")
    lightning_filter = DropMessages(LIGHTNING_INFO)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.seed",
                 "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).addFilter(lightning_filter)
    for name in ("transformers.utils.loading_report", "transformers.modeling_utils"):
        logging.getLogger(name).addFilter(DropOutputHeadReport())
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return f"{record.levelname.lower()}: {text}" if record.levelno >= logging.WARNING else text


def _project_handler() -> logging.Handler:
    """vapo-pl's own messages: ``warning: <message>`` on stderr, one line, no logger name or source path."""
    for h in logging.getLogger("vapo_pl").handlers:
        if getattr(h, "_vapo_pl", False):
            return h
    handler = logging.StreamHandler()
    handler.setFormatter(_OneLine())
    handler.setLevel(logging.WARNING)
    handler._vapo_pl = True  # type: ignore[attr-defined]
    return handler
