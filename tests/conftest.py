"""Shared test set-up: one torch thread (two threads on these 2-core machines run tiny models 30-150x slower), and
the log capture the third-party interop tests use."""

import logging

import pytest
import torch

torch.set_num_threads(1)
torch.manual_seed(0)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings_log():
    """The WARNING messages diffusers, PEFT and transformers log during a test (unexpected/missing keys …)."""
    handler = _Records()
    loggers = [logging.getLogger(n) for n in ("diffusers", "peft", "transformers")]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler.messages
    for lg in loggers:
        lg.removeHandler(handler)
