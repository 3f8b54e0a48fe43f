# `make test` and `make demo` set everything up on a fresh machine: a cached virtualenv with pinned dependencies,
# GoogleTest from Debian when missing, the extension build, then the run.
SHELL := /bin/bash
.DEFAULT_GOAL := test

# The first Python >= 3.10 found (3.11 first: the version CI runs); `make PYTHON=python3.12 ...` picks another.
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3.10 python3; do \
  if command -v $$p > /dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2> /dev/null; then \
  echo $$p; break; fi; done)
PYTHON_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2> /dev/null)
CACHE ?= $(HOME)/.cache/ropekit
VENV_HASH := $(shell (echo $(PYTHON_VERSION); cat requirements/dev.txt) | sha256sum | cut -c1-12)
TF457_HASH := $(shell (echo $(PYTHON_VERSION); cat requirements/transformers-4.57.txt) | sha256sum | cut -c1-12)
TFNEW_HASH := $(shell (echo $(PYTHON_VERSION); cat requirements/transformers-newest.txt) | sha256sum | cut -c1-12)
VENV ?= $(CACHE)/venv-$(VENV_HASH)
TF457 ?= $(CACHE)/transformers-4.57-$(TF457_HASH)
TFNEW ?= $(CACHE)/transformers-newest-$(TFNEW_HASH)
PY := $(VENV)/bin/python
CMAKE_BUILD := build/cmake

export PATH := $(VENV)/bin:$(PATH)
export PYTHONPATH := $(if $(filter $(CURDIR)/python,$(subst :, ,$(PYTHONPATH))),$(PYTHONPATH),$(CURDIR)/python$(if $(PYTHONPATH),:$(PYTHONPATH)))
export MAX_JOBS ?= $(shell nproc)

.PHONY: test demo bench build venv tf457 tfnew gtest-deps cmake-build test-python test-tf457 test-tfnew test-cpp \
  test-sanitize clean

# The folders are named by the requirement files' hashes, so a stamp is valid for as long as it exists; no file-time
# prerequisites (a fresh clone's files are all newer than the cache and would force a reinstall every run).
venv: $(VENV)/.ready
$(VENV)/.ready:
	@if [ -z "$(PYTHON_VERSION)" ]; then echo "ropekit needs Python >= 3.10 (none found; set PYTHON=...)"; exit 1; fi
	@echo "creating the virtualenv $(VENV) with $(PYTHON) (Python $(PYTHON_VERSION))"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements/dev.txt
	touch $@

tf457: $(TF457)/.ready
$(TF457)/.ready: | $(VENV)/.ready
	rm -rf $(TF457)
	$(VENV)/bin/pip install --quiet --target $(TF457) -r requirements/transformers-4.57.txt
	touch $@

gtest-deps:
	@if [ ! -f /usr/include/gtest/gtest.h ]; then \
	  echo "installing GoogleTest (libgtest-dev) from Debian"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq libgtest-dev; \
	fi

# The newest transformers release (requirements/transformers-newest.txt), installed as pip installs it: with its
# dependencies (5.25: the kernels package), into a --target folder put first on PYTHONPATH.
tfnew: $(TFNEW)/.ready
$(TFNEW)/.ready: | $(VENV)/.ready
	rm -rf $(TFNEW)
	$(VENV)/bin/pip install --quiet --target $(TFNEW) -r requirements/transformers-newest.txt
	touch $@

build: venv
	$(PY) setup.py --quiet build_ext --inplace

# ninja 1.13 reads make's jobserver from MAKEFLAGS, whose pipe a recipe of `make -j` does not inherit ("Could not
# initialize jobserver"): the builds that run inside `make test`'s suites get their own job count instead
NO_JOBSERVER := MAKEFLAGS=

# `make test` builds once, then runs the suites with BUILT empty: no suite rebuilds the extension while another
# imports it
BUILT ?= build

cmake-build: venv gtest-deps
	cmake -S . -B $(CMAKE_BUILD) -G Ninja -DPython3_EXECUTABLE=$(PY) > /dev/null
	$(NO_JOBSERVER) cmake --build $(CMAKE_BUILD)

test-python: $(BUILT)
	$(PY) -m pytest tests/python -q

test-tf457: $(BUILT) tf457
	PYTHONPATH=$(TF457):$(PYTHONPATH) $(PY) -m pytest tests/python -q -m transformers

test-tfnew: $(BUILT) tfnew
	PYTHONPATH=$(TFNEW):$(PYTHONPATH) $(PY) -m pytest tests/python -q -m transformers

test-cpp: cmake-build
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# The CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer: the GoogleTest suite (its own CMake build), then
# the Python op tests against an instrumented copy of the extension with the sanitizer runtimes preloaded.
ASAN_BUILD := build/sanitize
SANITIZER_RUNTIME = $(shell gcc -print-file-name=libasan.so) $(shell gcc -print-file-name=libubsan.so)
SANITIZER_ENV = ASAN_OPTIONS=detect_leaks=0:verify_asan_link_order=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1
test-sanitize: venv gtest-deps
	cmake -S . -B $(ASAN_BUILD)/cmake -G Ninja -DPython3_EXECUTABLE=$(PY) -DROPEKIT_SANITIZE=ON \
	  -DCMAKE_BUILD_TYPE=RelWithDebInfo > /dev/null
	$(NO_JOBSERVER) cmake --build $(ASAN_BUILD)/cmake
	$(SANITIZER_ENV) ctest --test-dir $(ASAN_BUILD)/cmake --output-on-failure
	$(NO_JOBSERVER) ROPEKIT_SANITIZE=1 $(PY) setup.py --quiet build_ext --build-lib $(ASAN_BUILD)/lib --build-temp $(ASAN_BUILD)/temp
	rm -rf $(ASAN_BUILD)/python && mkdir -p $(ASAN_BUILD)/python
	cp -r python/ropekit $(ASAN_BUILD)/python/ && rm -f $(ASAN_BUILD)/python/ropekit/*.so
	cp $(ASAN_BUILD)/lib/ropekit/_C*.so $(ASAN_BUILD)/python/ropekit/
	LD_PRELOAD="$(SANITIZER_RUNTIME)" $(SANITIZER_ENV) PYTHONPATH=$(CURDIR)/$(ASAN_BUILD)/python $(PY) -c \
	  "import ropekit._C as c; assert '$(ASAN_BUILD)' in c.__file__, c.__file__; print('sanitized:', c.__file__)"
	LD_PRELOAD="$(SANITIZER_RUNTIME)" $(SANITIZER_ENV) PYTHONPATH=$(CURDIR)/$(ASAN_BUILD)/python \
	  ROPEKIT_RI_CASES=300 ROPEKIT_RI_WILD_CASES=300 ROPEKIT_OMNI_CASES=150 $(PY) -m pytest -q -p no:cacheprovider \
	  tests/python/test_apply_rope.py tests/python/test_rope_table.py tests/python/test_qk_norm_rope.py \
	  tests/python/test_rope_index.py tests/python/test_omni_rope_index.py tests/python/test_table_fidelity.py \
	  tests/python/test_opcheck_compile.py

# The five suites run two at a time: most of a pytest run keeps one core busy, so on CI's two cores this halves the
# wall time, not the work. Each suite's output is printed whole when it ends (--output-sync); the first failure fails
# the run once the suites in flight end. The build and the transformers folders come first, so no suite ever sees
# the extension being replaced. SUITE_JOBS=1 runs them one after another. Each suite's torch uses one intra-op
# thread (SUITE_THREADS): two suites of two OpenMP threads each on two cores ran 5x slower than one alone
# (test_families.py: 151 s for two against 29 s for one; 28 s for two with one thread each). The tests that
# exercise the multi-threaded kernels set their thread count themselves (test_cpu_isa).
SUITE_JOBS ?= 2
SUITE_THREADS ?= 1
test: build tf457 tfnew
	OMP_NUM_THREADS=$(SUITE_THREADS) $(MAKE) --no-print-directory -j$(SUITE_JOBS) --output-sync=target BUILT= \
	  test-python test-tfnew test-tf457 \
	  test-sanitize test-cpp

# RECORD=1: append the demo's tables to benchmarks/RESULTS.md (otherwise the checkout is left as it was)
demo: build
	$(PY) benchmarks/demo.py $(if $(RECORD),--record)

bench: build
	$(PY) benchmarks/bench_rope.py
	$(PY) benchmarks/bench_qk_norm_rope.py
	$(PY) benchmarks/bench_rope_index.py
	$(PY) benchmarks/bench_vision.py
	$(PY) benchmarks/bench_host_overhead.py

clean:
	rm -rf build python/ropekit/*.so
