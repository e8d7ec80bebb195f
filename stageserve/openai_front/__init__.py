"""The OpenAI-compatible HTTP front: its own process (`stageserve openai`), a gRPC client of the
router, so it scales by running more of them and takes no CPU from the router's engine.

protocol.py: the OpenAI request bodies and their translation to `GenerateRequest`, and the
response bodies built from `GenerateResponse`s. app.py: the HTTP routes (FastAPI), errors,
streaming, cancellation. server.py: configuration and the uvicorn server.
"""
