"""OpenAI-compatible HTTP server over the continuous-batching engine (see serving/README.md).

    uvicorn serving.app:app          # settings from ASCEND_DSPARK_SERVE_* variables
    ascend-dspark serve --port 8000  # the same, settings from flags
"""
