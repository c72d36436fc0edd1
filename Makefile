# Two commands do everything on a fresh machine (see README.md):
#   make demo   - virtualenv, dependencies, Kafka jars, local broker, model, streaming pipeline on a replay
#   make test   - the same set-up, then the test suite against a real local Kafka broker
# Every target is safe to re-run.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: venv jars kcat prometheus chromium test test-slow demo lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

jars: venv
	$(BIN)/lrustream broker fetch

# Debian's kcat (a Kafka client nobody here wrote) for the interoperability test: the one on PATH, else the
# Debian packages downloaded and unpacked under .lrustream/kcat (no root needed). Best effort: the test says
# what is missing, and fails instead of skipping when CI=true.
KCAT_DIR = .lrustream/kcat
kcat:
	@command -v kcat >/dev/null || test -x $(KCAT_DIR)/usr/bin/kcat || ( \
	  mkdir -p $(KCAT_DIR)/debs && cd $(KCAT_DIR)/debs && apt-get download kcat librdkafka1 libyajl2 && \
	  for f in *.deb; do dpkg -x $$f ..; done ) || echo "kcat: not installed (apt-get download failed)"

# Debian's `prometheus` package (promtool and the server) for the monitoring tests (tests/unit/test_monitoring.py,
# tests/integration/test_prometheus.py): the one on PATH; else, as root, `apt-get install` (no recommended
# packages); else the package downloaded and unpacked under .lrustream/prometheus (no root needed, no service
# set up). Best effort: without apt-get it prints a note, and the tests skip, or fail when CI is set.
PROM_DIR = .lrustream/prometheus
prometheus:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || test -x $(PROM_DIR)/usr/bin/promtool || \
	if ! command -v apt-get >/dev/null; then echo "prometheus: not installed (no apt-get here)"; \
	elif [ "$$(id -u)" = 0 ]; then ( apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq --no-install-recommends prometheus ) >/dev/null 2>&1 || \
	  echo "prometheus: not installed (apt-get install prometheus failed)"; \
	else ( mkdir -p $(PROM_DIR)/debs && cd $(PROM_DIR)/debs && apt-get download prometheus >/dev/null 2>&1 && \
	  for f in prometheus_*.deb; do dpkg -x $$f ..; done ) || echo "prometheus: not installed (apt-get download failed)"; fi

# Debian's Chromium for the trainer's operator page in a headless browser (tests/unit/trainer/test_page.py): the
# one on PATH; else, as root, `apt-get install`. Chromium's libraries cannot be unpacked without root, so other
# users get a note, and the test skips, or fails when CI is set.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then ( apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium ) >/dev/null 2>&1 || \
	  echo "chromium: not installed (apt-get install chromium failed)"; \
	else echo "chromium: not installed (install Debian's chromium as root)"; fi

# pytest exits 5 when it collects no tests: a failure like any other (a suite that runs nothing proves nothing).
# `make test` runs everything, the slow reliability tier included (about 25 minutes on 2 cores); `make test-slow`
# runs that tier alone.
test: jars kcat prometheus chromium
	$(BIN)/python -m pytest -q --run-slow

test-slow: jars
	$(BIN)/python -m pytest -q -m slow --run-slow

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports

demo: jars
	$(BIN)/lrustream demo

clean:
	-$(BIN)/lrustream broker stop
	rm -rf .lrustream
