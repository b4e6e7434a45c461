# IBEX Harness — the two commands: `make dev` (local stack) and `make test` (what CI runs).
.DEFAULT_GOAL := help
SHELL := /usr/bin/env bash

.PHONY: help dev dev-down dev-clean dev-status dev-smoke db-migrate db-seed test ci deps build fmt clippy

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

dev: ## start Postgres, Redis, ibex-authd and ibex-proxy under .ibex/, migrated and seeded
	@scripts/dev.sh up

dev-down: ## stop everything `make dev` started (data in .ibex/ is kept)
	@scripts/dev.sh down

dev-clean: ## dev-down, then delete .ibex/ (data, ports, admin key)
	@scripts/dev.sh clean

dev-status: ## what of the dev stack is running
	@scripts/dev.sh status

dev-smoke: ## check the running dev stack end to end (health, auth failures, probe, chat)
	@scripts/dev-smoke.sh

db-migrate: ## ibexctl migrate against the dev Postgres (starts it if needed)
	@scripts/dev.sh migrate

db-seed: ## ibexctl seed against the dev Postgres; writes .ibex/dev.env
	@scripts/dev.sh seed

test: ## fmt check, clippy -D warnings, build, every unit and integration test (CI)
	@scripts/test.sh

ci: test ## alias of test

deps: ## install missing system packages (root) or print the command to run
	@scripts/ensure-deps.sh

build: ## debug build of every binary
	cargo build --workspace --bins

fmt: ## format the workspace
	cargo fmt --all

clippy: ## lints as CI runs them
	cargo clippy --workspace --all-targets -- -D warnings
