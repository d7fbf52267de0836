# The README's two commands: `make train` (set up, then a short CIFAR-10 run) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= $(abspath ../shared/data/tfds)
CONFIG ?= configs/cifar10.py:short
# One workdir per config and variant (configs/cifar10.py:hour -> runs/cifar10-hour), so that
# another CONFIG never resumes this one's checkpoints.
CONFIG_FILE := $(basename $(notdir $(word 1,$(subst :, ,$(CONFIG)))))
CONFIG_VARIANT := $(subst /,_,$(word 2,$(subst :, ,$(CONFIG))))
WORKDIR ?= runs/$(CONFIG_FILE)$(if $(CONFIG_VARIANT),-$(CONFIG_VARIANT))

.PHONY: setup train test lint clean

setup: $(STAMP)

# MKL (the `mkl` extra, about 320 MB of wheels) only where it pays: on Intel CPUs.
COMMA := ,
EXTRAS := test,wandb,onnx$(if $(shell grep -qs GenuineIntel /proc/cpuinfo && echo y),$(COMMA)mkl)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

train: $(STAMP)
	TFDS_DATA_DIR=$(DATA_DIR) $(BIN)/python train.py --config=$(CONFIG) --workdir=$(WORKDIR)

test: $(STAMP)
	TFDS_DATA_DIR=$(DATA_DIR) $(BIN)/python -m pytest -n 2 --dist loadfile -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
