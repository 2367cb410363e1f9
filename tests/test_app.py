from fastapi.testclient import TestClient

from myllm.api.app import create_app
from myllm.registry.store import Registry


def test_root_counts_registered_models(shared_registry: Registry) -> None:
    with TestClient(create_app(), base_url="http://localhost") as client:
        body = client.get("/").json()
        assert body == {"name": "MyLLM", "version": "0.1.0", "status": "running", "models_available": 2}
        health = client.get("/health").json()
        assert health["status"] == "healthy" and "timestamp" in health
