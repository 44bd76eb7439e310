# Two commands for a fresh machine (Python 3.11 + pip): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q -e .

install-test: $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

# Fetch the movie snippets, embed them, train a sentiment head, run one search query.
demo: install
	$(BIN)/embedpipe fetch-data
	$(BIN)/embedpipe run jobs/movie_reviews.toml
	$(BIN)/embedpipe train-head out/movie-reviews --label-column label --out out/movie-reviews-head
	$(BIN)/embedpipe search out/movie-reviews "a warm, funny film with a great cast" -k 5

test: install-test
	$(BIN)/python -m pytest -q -ra

clean:
	rm -rf out .pytest_cache
