"""Every end-to-end test starts from a clean Dynamo cache and an empty bwta report, so graph
counts and report totals belong to that test alone."""

import pytest
import torch

import bwta_compiler as bc


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    bc.reset_reports()
    yield
    torch._dynamo.reset()
