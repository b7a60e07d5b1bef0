"""The conformance tests start real servers and agents with the integration fixtures."""

from tests.integration.conftest import make_server  # noqa: F401 - re-exported fixture
