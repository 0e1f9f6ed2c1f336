# maskray's set-up, demo and tests. Every target sets up what it needs first and
# reuses the environment on a second run (the build is redone only when csrc/,
# setup.py or pyproject.toml changed).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.maskray-installed
BUILD_INPUTS := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: setup demo test bench cuda-check gpu-check clean

setup: $(STAMP)

# torch and torchvision are pinned to the builds this project is tested with;
# the extension is then compiled against that torch (no build isolation, which
# would compile against a different, freshly downloaded torch).
$(STAMP): $(BUILD_INPUTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "setuptools>=77" wheel ninja
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

# The main job on an embedded default: sample images, a local Ray cluster, the
# demo model, Parquet in ./maskray-demo, a query printed and an overlay PNG.
demo: setup
	$(BIN)/maskray demo

test: setup browser
	$(BIN)/python -m pytest -q --durations=20

# Debian's Chromium, which the `maskray browse` tests drive headless (installed when missing).
.PHONY: browser
browser:
	.ci/install-browser

bench: setup
	$(BIN)/python bench/roi_ops.py
	$(BIN)/python bench/model.py --light
	$(BIN)/python bench/pipeline.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/show.py

# Compile-only check of the CUDA kernels (needs nvcc, not a GPU).
cuda-check: setup
	PYTHON=$(BIN)/python .ci/compile-cuda

# Everything that needs a GPU, in one run of under 8 minutes (bench/gpu_check.py): the build
# with CUDA kernels, the CUDA tests, the CUDA RoI ops against torchvision's, and the R50-FPN
# model and the segmentation job in float16 and bfloat16 over batch sizes 1-16. Run it first
# whenever a GPU is at hand; without one it says so and fails.
gpu-check: setup
	$(BIN)/python bench/gpu_check.py

clean:
	rm -rf build *.egg-info model/_C*.so $(STAMP)
