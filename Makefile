# Two entry points: `make demo` (the main job) and `make test`. Both install what they need,
# idempotently: pip skips what is present, and the extension is rebuilt only when its sources change.
PYTHON ?= python3
CUDA_HOME ?= /usr/local/cuda
export CUDA_HOME
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)

.PHONY: install demo test bench clean
install: build/.installed

build/.installed: requirements-dev.txt $(SOURCES)
	$(PYTHON) -m pip install -q -r requirements-dev.txt
	$(PYTHON) -m pip install -q --no-build-isolation -e .
	@mkdir -p build && touch $@

demo: install
	$(PYTHON) -m linkbreaker_ext.cli demo --out demo-out --json demo-out/demo.json

test: install
	$(PYTHON) -m pytest tests

bench: install
	$(PYTHON) -m pytest bench --benchmark-only

clean:
	rm -rf build dist *.egg-info linkbreaker_ext/*.so demo-out
