"""`ldm serve`: AUTOMATIC1111's HTTP API over a warm pipeline (FastAPI + uvicorn, the `serve` extra)."""
