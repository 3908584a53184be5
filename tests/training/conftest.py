"""Fixtures for the training tests."""

import pytest


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; a test that trains starts and ends without them."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
