# make bench: the whole benchmark (bench/README.md, "run.py"), about 15-20 minutes on 2 cores.
# make bench-quick: the same with tiny counts and one repetition, to check the harness (a few minutes).
# VENV=/path/to/venv uses an existing venv (with bumper and mitmproxy 12) instead of making .venv;
# BENCH_ARGS="--only w1,w2 --contenders bumper,mitmproxy" is passed to bench/run.py.
VENV ?= .venv
BENCH_ARGS ?=

.PHONY: bench bench-quick bench-setup bench-clean

bench: bench-setup
	$(VENV)/bin/python bench/run.py $(BENCH_ARGS)

bench-quick: bench-setup
	$(VENV)/bin/python bench/run.py --quick $(BENCH_ARGS)

bench-setup:
	VENV=$(VENV) bash bench/setup.sh

bench-clean:
	rm -rf bench/.cache
