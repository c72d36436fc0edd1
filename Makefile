# Two commands do everything on a fresh machine (see README.md):
#   make demo   - virtualenv, dependencies, Kafka jars, local broker, model, streaming pipeline on a replay
#   make test   - the same set-up, then the test suite against a real local Kafka broker
# Every target is safe to re-run.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: venv jars test test-slow demo lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

jars: venv
	$(BIN)/lrustream broker fetch

test: jars
	$(BIN)/python -m pytest -q

test-slow: jars
	$(BIN)/python -m pytest -q -m slow --run-slow

lint: venv
	$(BIN)/ruff check .

demo: jars
	$(BIN)/lrustream demo

clean:
	-$(BIN)/lrustream broker stop
	rm -rf .lrustream
