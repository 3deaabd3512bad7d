# pd-deploy developer entry points. See README.md.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
VLLM_ASCEND_VENV ?= .venv-vllm-ascend
KSANA_ROUTER_VENV ?= .venv-ksana-router
BIN := $(VENV)/bin
INVENTORY ?= inventories/local/inventory.yml
PYTEST_ARGS ?=

.PHONY: demo demo-status demo-clean test lint unit venv deps vllm-venv ksana-router-venv plan

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

deps:
	.ci/install-deps.sh test

## The real `vllm serve` parsers of tests/conformance, one venv per flavour: vLLM 0.33.0
## (NVIDIA/NIXL) and vLLM 0.23.0 with vLLM-Ascend 0.23.0.post1. Cached: a stamp makes a
## second run a no-op (< 1 s each); from scratch ~1 min each.
vllm-venv:
	.ci/install-vllm.sh $(VLLM_VENV) .ci/requirements-vllm.txt
	.ci/install-vllm.sh $(VLLM_ASCEND_VENV) .ci/requirements-vllm-ascend.txt

## A Python for KsanaLLM's simple_router (its requirements, from PyPI; the router itself
## comes from a KsanaLLM tree: PD_KSANA_HOME, pd_ksana_home).
ksana-router-venv:
	$(PYTHON) -m venv $(KSANA_ROUTER_VENV)
	$(KSANA_ROUTER_VENV)/bin/pip install -q fastapi==0.165.0 uvicorn==0.54.0 \
		sqlalchemy==2.1.9 httpx==0.28.1 pydantic==2.14.4

## The local emulated cluster: deploy, one streaming request through the proxy, how to reach it.
demo: venv
	.ci/install-deps.sh demo
	$(BIN)/ansible-playbook -i $(INVENTORY) site.yml
	@$(BIN)/python -m pd_deploy.demo_request -i $(INVENTORY)

demo-status: venv
	$(BIN)/ansible-playbook -i $(INVENTORY) status.yml

demo-clean: venv
	$(BIN)/ansible-playbook -i $(INVENTORY) cleanup.yml

plan: venv
	$(BIN)/pd-deploy plan -i $(INVENTORY)

lint: venv
	$(BIN)/ruff check pd_deploy pd_launcher plugins tests bench
	$(BIN)/yamllint -s .
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ansible-lint --profile production --offline -q site.yml status.yml cleanup.yml logs.yml restart.yml playbooks roles

unit: venv
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

## Everything CI runs: system packages, the virtualenvs, linters, the whole test suite.
test: deps venv vllm-venv lint
	PD_VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python \
	PD_VLLM_ASCEND_PYTHON=$(CURDIR)/$(VLLM_ASCEND_VENV)/bin/python \
		.ci/pytest-split.sh $(BIN)/pytest $(PYTEST_ARGS)
