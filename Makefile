# Targets for developers and CI. Each one installs what is missing first (scripts/install.sh).

# Debian 12 has `python3` and no `python` unless a virtual environment or pyenv provides one.
PYTHON ?= $(shell command -v python >/dev/null 2>&1 && echo python || echo python3)
DEMO_SECONDS ?= 30
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install test demo bench dev-up dev-down

install:
	PYTHON=$(PYTHON) scripts/install.sh

# pytest exits 5 when it collected no tests; a run that tested nothing is a failure here.
test: install
	@status=0; $(PYTHON) -m pytest tests $(PYTEST_ARGS) || status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

demo: install
	DEMO_SECONDS=$(DEMO_SECONDS) $(PYTHON) -m ssmd.dev.demo

bench: install
	$(PYTHON) -m ssmd bench $(BENCH_ARGS)

dev-up: install
	$(PYTHON) -m ssmd dev up

dev-down:
	$(PYTHON) -m ssmd dev down
