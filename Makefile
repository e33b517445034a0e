# Raw FedAvg — the commands of the README. Needs only python3 and make:
# Poetry is bootstrapped into .tools/ when it is not on PATH.
SHELL := /bin/bash
PYTHON ?= python3
APPS := client_1 client_2 server client_host
TOOLS := $(CURDIR)/.tools
POETRY ?= $(or $(shell command -v poetry 2>/dev/null),$(TOOLS)/poetry/bin/poetry)
export POETRY

# The browser the page tests drive (tests/test_page.py reads CHROMIUM too):
# `make test-all CHROMIUM=/path/to/chromium` uses another one.
CHROMIUM ?= /usr/bin/chromium
export CHROMIUM

.PHONY: install run-all demo sim bench compare privacy certs browser test test-all clean
ROUNDS ?= 20

install: $(addsuffix /.venv/.installed,$(APPS))

$(TOOLS)/poetry/bin/poetry:
	@echo "poetry not on PATH: installing it into $(TOOLS)/poetry"
	$(PYTHON) -m venv $(TOOLS)/poetry
	$(TOOLS)/poetry/bin/pip install --quiet 'poetry>=2.0,<3.0'

# One stamp per environment: reinstall when its pyproject or lock changes.
# --compile writes every installed module's bytecode once, here: a machine
# with PYTHONDONTWRITEBYTECODE set would otherwise compile NumPy, Flask and
# matplotlib from source in every process it starts (a second of CPU each).
%/.venv/.installed: %/pyproject.toml %/poetry.lock fedavg/pyproject.toml | $(POETRY)
	cd $* && $(POETRY) install --no-interaction --compile
	touch $@

.venv/.installed: pyproject.toml poetry.lock fedavg/pyproject.toml server/pyproject.toml | $(POETRY)
	$(POETRY) install --no-interaction --compile
	touch $@

# `make run-all ARGS="--server-port 5050"`: any of run_all.py's flags (--help lists them).
run-all: install
	$(PYTHON) scripts/run_all.py $(ARGS)

demo: install
	cd server && $(POETRY) run python ../scripts/demo.py

# K is passed only when given: sim.py's default is 50 clients, 2 for the seed.
# `make sim SIM_ARGS=--keep` leaves the page up after the run (Ctrl-C stops it).
# `make sim POPULATION=1000000 FRACTION=0.01 ROUNDS=100`: a population reached by index.
sim: install
	$(PYTHON) scripts/sim.py $(if $(filter command line environment,$(origin K)),--clients $(K)) \
		$(if $(POPULATION),--population $(POPULATION)) $(if $(FRACTION),--fraction $(FRACTION)) \
		--rounds $(ROUNDS) $(SIM_ARGS)

# Figures, not pass/fail: every app started as the README starts it; prints a
# table and writes bench/results.json. `make bench ARGS=--quick` for a quick look.
bench: install .venv/.installed
	.venv/bin/python scripts/bench.py $(ARGS)

# Each strategy on one federation, against the pooled optimum: a table, and
# compare.json/.png/.svg in OUT. The federations run in this Python (the
# server and client apps' code in-process, no sockets), so only the root
# environment: it needs scikit-learn for SCENARIO=diabetes. ROUNDS and
# CLIENTS are passed only when given (ROUNDS above defaults to 20 for sim;
# compare's own default is 200 rounds). STRATEGIES: by default every
# strategy registered in fedavg.strategies.STRATEGIES, so a new one needs no edit here.
SCENARIO ?= seed
OUT ?= compare-out
compare: .venv/.installed
	.venv/bin/python scripts/compare.py --scenario $(SCENARIO) $(if $(STRATEGIES),--strategies "$(STRATEGIES)") --out "$(OUT)" \
		$(if $(filter command line environment,$(origin ROUNDS)),--rounds $(ROUNDS)) \
		$(if $(CLIENTS),--clients $(CLIENTS)) $(COMPARE_ARGS)

# What differential privacy costs: DP-FedAvg at several noise multipliers on
# the seed, on 50 iid clients and on a population of POPULATION clients
# Poisson-sampled at q = 0.01 (default 1,000,000; 0 leaves it out), ε against the
# final MSE (docs/PRIVACY.md). Its federations run in-process
# (fedavg_server.inprocess): the root environment is all it needs.
privacy: .venv/.installed
	.venv/bin/python scripts/privacy.py --out "$(if $(filter command line environment,$(origin OUT)),$(OUT),privacy-out)" \
		$(if $(POPULATION),--population $(POPULATION)) $(PRIVACY_ARGS)

# A CA and certificates for a trial of mutual TLS (docs/DEPLOY.md), into
# certs/ (git ignores it); refuses to replace it without --force.
# `make certs ARGS="--clients 5 --hosts localhost 127.0.0.1 10.0.0.5"`.
certs: .venv/.installed
	.venv/bin/python scripts/make_certs.py $(ARGS)

# Installs Chromium when missing and it can (root with apt-get); otherwise
# stops at once with the command to run. .ci/run relies on this step too.
browser:
	@scripts/ensure_browser.sh

# The everyday tier: every test that runs in this process (the math, every
# strategy, DP, secure aggregation and the robust rules on in-process
# federations, the parsers, the store). ruff first: seconds, not minutes.
# `make test PYTEST_ARGS='-k dp'` passes arguments through (docs/TESTS.md).
test: .venv/.installed
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -m "not system" $(PYTEST_ARGS)

# Everything: make test, then the tests marked system, which start the apps
# as processes the way the README does, drive Chromium, use network
# namespaces (as root) or fuzz the APIs; two at a time, one per core
# (XDIST=0 for one at a time). browser first: on a machine without it, fail
# before minutes of installing. What .ci/run runs.
XDIST ?= 2
test-all: browser install test
	.venv/bin/python -m pytest -m system $(if $(filter-out 0,$(XDIST)),-n $(XDIST)) $(PYTEST_ARGS)

clean:
	rm -rf .venv $(addsuffix /.venv,$(APPS)) $(TOOLS)
