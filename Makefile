# Two commands do everything on a fresh machine: `make run` and `make test`.
# Both create the virtual environment first when it is missing or out of date.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
WORKDIR ?= runs/digits_vp
# glibc maps XLA:CPU's per-run buffers as huge pages: a CPU training step 25-30% faster
# (diffusion_sde/host_memory.py). A GLIBC_TUNABLES of your own is kept as it is.
GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
export GLIBC_TUNABLES

.PHONY: install test test-slow run lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

test-slow: $(STAMP)
	$(PY) -m pytest -n 2 -q -m slow

# The default run: train the digits VP model (resuming if WORKDIR has a checkpoint), then
# print the test bits/dim. Samples: $(WORKDIR)/samples/step_*.png. FID/KID of 1,000
# samples: the same --mode=eval without the last line (a few more minutes). Compiled
# programs are kept in $JAX_COMPILATION_CACHE_DIR, by default ~/.cache/diffusion_sde/jax.
run: $(STAMP)
	$(PY) -m diffusion_sde.main \
		--config=configs/digits_vp.py --workdir=$(WORKDIR)
	$(PY) -m diffusion_sde.main \
		--config=configs/digits_vp.py --workdir=$(WORKDIR) --mode=eval \
		--config.eval.enable_sampling=False

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP)
	for script in experiments/benchmarks/*.py; do \
		case $$script in *_torch.py) continue;; esac; \
		$(PY) $$script || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
