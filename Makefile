# Two commands for a fresh machine (Python 3.11 + pip): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test install install-test pgvector cpu-emulator clean gpu-carry docs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The editable install compiles the attention kernel in place (setup.py) with this venv's torch,
# hence torch and the build tools first and no build isolation (which would install torch again).
BUILD_DEPS := torch==2.13.0 'setuptools>=64' wheel

install: $(BIN)/python
	$(BIN)/pip install -q $(BUILD_DEPS)
	$(BIN)/pip install -q --no-build-isolation -e .

install-test: $(BIN)/python
	$(BIN)/pip install -q $(BUILD_DEPS)
	$(BIN)/pip install -q --no-build-isolation -e '.[test]'

# Fetch the movie snippets, embed them, train a sentiment head, run one search query.
demo: install
	$(BIN)/embedpipe fetch-data
	$(BIN)/embedpipe run jobs/movie_reviews.toml
	$(BIN)/embedpipe train-head out/movie-reviews --label-column label --out out/movie-reviews-head
	$(BIN)/embedpipe search out/movie-reviews "a warm, funny film with a great cast" -k 5

# Two test processes (pytest-xdist): the fixtures take free ports and their own folders, and the
# suite runs in ~60% of its serial time on CI's 2 cores.
test: install-test pgvector cpu-emulator
	$(BIN)/python -m pytest -q -ra -n 2 --durations=20

# The documentation site (mkdocs.yml, docs/), built as CI builds it: any broken link fails.
docs: install-test
	$(BIN)/mkdocs build --strict -d site

# QEMU's user-mode emulator, so that the tests also run the attention kernel's library and
# pgvector on an emulated AVX2-only CPU (AMD Zen 3) whatever CPU this is (as root, with apt;
# elsewhere those tests skip and say why).
cpu-emulator:
	@command -v qemu-x86_64 >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get install -y -qq qemu-user >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq qemu-user >/dev/null; }) \
	  || echo "qemu-user not installed: the emulated-CPU tests will skip" >&2; }

# Debian's PostgreSQL 15 with pgvector built for baseline x86-64, for the sink tests (as root;
# cached: a second run does nothing; where it cannot install, the pgvector tests skip).
pgvector:
	bash tests/sinks/setup_pgvector.sh

# What bench/gpu_check.sh needs on a GPU machine without network, in the git-ignored gpu_carry/:
# the pinned faiss-cpu wheel (abi3, any CPython >= 3.10), the bundled model's folder in float16
# and 2,000 rows of the bench corpus (about 62 MiB with the tree; the device machines take 64 MiB).
gpu-carry: $(BIN)/python
	$(BIN)/python -m bench.gpu_check --prepare --carry gpu_carry

clean:
	rm -rf out .pytest_cache site
