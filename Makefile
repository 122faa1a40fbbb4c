# Shortcuts. `make quickstart` and `make test` set everything up themselves (a .venv in the project).
# On a GPU machine pick the torch build you need, e.g.  make setup TORCH_SPEC="torch==2.13.0 --index-url ..."
PY ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup quickstart test lint train-pretrain train-sft train-reward train-dpo train-rlhf pipeline bench \
	shakespeare tensorboard clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with torch, the package and the test tools

quickstart: $(STAMP)  ## train the tiny pretraining recipe on the shipped sample, then print a sample
	$(BIN)/minillm fit --config configs/pretrain_tiny.yaml
	$(BIN)/minillm generate --checkpoint checkpoints/pretrain_tiny/last.ckpt --prompt "3 plus 4 equals" --prompt "A cow says" --max_new_tokens 24

test: $(STAMP)  ## the full test suite (what CI runs); MINILLM_TEST_DATA=<dir> also runs the real-data tests
	$(BIN)/python -m pytest -q -n auto --dist worksteal --durations=15 tests

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

train-pretrain: $(STAMP)
	$(BIN)/minillm fit --config configs/pretrain_tiny.yaml

train-sft: $(STAMP)  ## needs train-pretrain
	$(BIN)/minillm fit --config configs/sft_tiny.yaml

train-reward: $(STAMP)  ## needs train-sft
	$(BIN)/minillm fit --config configs/reward_tiny.yaml

train-dpo: $(STAMP)  ## needs train-sft
	$(BIN)/minillm fit --config configs/dpo_tiny.yaml

train-rlhf: $(STAMP)  ## needs train-sft and train-reward
	$(BIN)/minillm fit --config configs/ppo_tiny.yaml

pipeline: $(STAMP)  ## pretrain -> SFT -> reward -> PPO, SFT -> DPO, then a comparison table
	$(BIN)/minillm pipeline --output checkpoints/pipeline --size tiny

bench: $(STAMP)  ## speed and memory of the tiny recipe (README "Performance")
	$(BIN)/minillm bench --config configs/pretrain_tiny.yaml --output checkpoints/bench.json

shakespeare: $(STAMP)
	test -f data/tinyshakespeare/input.txt || $(BIN)/minillm download tinyshakespeare
	$(BIN)/minillm fit --config configs/shakespeare_char.yaml

tensorboard: $(STAMP)
	$(BIN)/tensorboard --logdir checkpoints

clean:
	rm -rf checkpoints/*/ data/.cache
