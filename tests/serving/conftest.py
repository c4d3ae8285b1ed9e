"""The serving tests' fixtures: the bundled model offered by a server (held already: the session's loaded copy),
and a client of the application over it."""

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402

from latent_diffusion.cli.common import bundled_model  # noqa: E402
from latent_diffusion.serving.app import create_app  # noqa: E402
from latent_diffusion.serving.models import Models  # noqa: E402

from conftest import hold  # noqa: E402


@pytest.fixture(scope="module")
def models(bundled_pipe):
    return hold(Models(bundled_model()), bundled_pipe)


@pytest.fixture
def client(models):
    models.current = next(iter(models.paths))
    with TestClient(create_app(models, max_queue=4)) as client:
        yield client


@pytest.fixture
def serve(models):
    """start(**create_app keywords) -> (base URL, app): the application on a real uvicorn server on a free
    loopback port, in a thread (for clients that go away, concurrent requests and the browser)."""
    import threading

    import uvicorn

    running = []

    def start(**kwargs):
        app = create_app(models, **kwargs)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        running.append((server, thread))
        while not server.started:
            assert thread.is_alive(), "the server did not start"
            thread.join(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}", app

    yield start
    for server, thread in running:
        server.should_exit = True
        thread.join(10)
