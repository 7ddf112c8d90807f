import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def default_model() -> str:
    from spec_plugins.default_model import build

    return str(build())
