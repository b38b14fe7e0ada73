# make bench: the whole benchmark (bench/README.md, "run.py"), about 15-20 minutes on 2 cores.
# make bench-quick: the same with tiny counts and one repetition, to check the harness (a few minutes).
# VENV=/path/to/venv uses an existing venv (with bumper and mitmproxy 12) instead of making .venv;
# BENCH_ARGS="--only w1,w2 --contenders bumper,mitmproxy" is passed to bench/run.py.
# BASELINE=/path/to/other/venv compares two bumper builds side by side in one run (say before and after
# a dependency upgrade): that venv's bumper runs as one more contender, bumper-before, started as bumper
# is, and the table gets a bumper/bumper-before column (bench/run.py --baseline).
# make hostile: the hostile-peer suite (tests/test_hostile_peers.py, issue 22) at the issue's sizes, each
# case with a 30 s settle, about 10 minutes; its table goes to BUMPER_HOSTILE_TABLE (default
# bench/results/hostile-<UTC time>.md). ./test runs a bounded subset of it.
# make fuzz: the DER copier and mimic minting under atheris (tests/fuzz_certs.py) for FUZZ_SECONDS
# (default 300), seeded with the cryptography-vectors certificates; a crash leaves its input in
# fuzz-artifacts/. ./test runs the same harness for a few thousand runs with a fixed seed.
VENV ?= .venv
FUZZ_SECONDS ?= 300
BENCH_ARGS ?=
BASELINE ?=
RUN_ARGS = $(if $(BASELINE),--baseline $(BASELINE)) $(BENCH_ARGS)

.PHONY: bench bench-quick bench-setup bench-clean fuzz hostile

bench: bench-setup
	$(VENV)/bin/python bench/run.py $(RUN_ARGS)

bench-quick: bench-setup
	$(VENV)/bin/python bench/run.py --quick $(RUN_ARGS)

bench-setup:
	VENV=$(VENV) bash bench/setup.sh

bench-clean:
	rm -rf bench/.cache

fuzz:
	mkdir -p fuzz-artifacts
	$(VENV)/bin/python -m tests.fuzz_certs -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=fuzz-artifacts/

hostile:
	BUMPER_HOSTILE_FULL=1 $(VENV)/bin/pytest tests/test_hostile_peers.py -v -s
