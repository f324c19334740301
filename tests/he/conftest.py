"""HE service fixtures: a real server on 127.0.0.1 port 0 (grpc.aio on the shared loop thread), a small
scoring model, and bank keys per preset depth (key generation is the slow part, so they are shared)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from he_support import F, make_model  # noqa: E402

from services.he.keys import BankKeys  # noqa: E402
from services.he.model import ScoringModel, save_model  # noqa: E402


@pytest.fixture(scope="session")
def he_model() -> ScoringModel:
    return make_model()


@pytest.fixture(scope="session")
def he_server(loop_thread, he_model, tmp_path_factory):
    from services.he.config import HEServiceConfig
    from services.he.server import create_server

    path = save_model(he_model, tmp_path_factory.mktemp("he") / "model.json")
    other = save_model(make_model(seed=7), tmp_path_factory.mktemp("he") / "other.json")
    config = HEServiceConfig(model_files=(str(path), str(other)), max_contexts_per_tenant=32, plaintext_dev=True)
    server, port = loop_thread.run(create_server(config))
    loop_thread.run(server.start())
    yield server, f"127.0.0.1:{port}"
    loop_thread.run(server.stop(1))
    server.privlm_servicer.close()


@pytest.fixture(scope="session")
def target(he_server) -> str:
    return he_server[1]


@pytest.fixture(scope="session")
def engine(he_server):
    return he_server[0].privlm_servicer.engine


@pytest.fixture(scope="session")
def keys1() -> BankKeys:
    """Depth 1 with Galois keys for the single-record path."""
    return BankKeys.generate(depth=1, rotations_for=F)


@pytest.fixture(scope="session")
def keys1_plain() -> BankKeys:
    """Depth 1 without Galois keys (the batch-only context)."""
    return BankKeys.generate(depth=1)


@pytest.fixture(scope="session")
def keys2() -> BankKeys:
    return BankKeys.generate(depth=2, rotations_for=16)


@pytest.fixture(scope="session")
def keys3() -> BankKeys:
    return BankKeys.generate(depth=3)


@pytest.fixture(scope="session")
def client(target):
    from services.he.client import HEClient

    with HEClient(target) as c:
        yield c
