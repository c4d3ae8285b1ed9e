"""`ldm serve` refuses a port another server holds, in one line, before it loads a model."""

import socket

import pytest

from latent_diffusion.cli import main

pytest.importorskip("uvicorn")


def test_a_port_in_use_is_one_line_naming_it(capsys):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--port {port}: cannot listen there: another server listens" in err
