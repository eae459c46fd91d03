"""Label Studio's ML backend protocol, spoken by regcl (the routes: ``service.api.routers.
labelstudio``, mounted at ``/labelstudio``).

- :mod:`.config`: the parts of a labeling config the backend needs (image key, brush tag);
- :mod:`.prompts`: an interactive ``context`` (smart keypoints, rectangles) → a SAM prompt;
- :mod:`.images`: task images fetched from the configured Label Studio only, bounded, cached;
- :mod:`.annotations`: an annotation's brush masks, decoded and checked against its image;
- :mod:`.backend`: predict / ingest / train, over the engine, the sample sets and the jobs.
"""
