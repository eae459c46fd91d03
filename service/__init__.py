"""The regcl service, in three rooms under ``app.py`` (``create_app`` and its lifespan):

- :mod:`service.api`: the HTTP layer (routers, schemas, auth, problem+json errors, OpenAPI,
  uploads, metrics, the process's runtime);
- :mod:`service.engine`: the serving SAM (images, encoding and batching, decoding, adapters,
  embedding cache, ``auto`` routing, live swaps, the decoder's ONNX export);
- :mod:`service.labelstudio`: Label Studio's ML backend protocol (its wire formats, its image
  fetch rules, annotations into sample sets).

``engine`` imports neither of the others, ``labelstudio`` imports the engine, ``api`` both.
"""
