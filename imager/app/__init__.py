"""The web app and HTTP API of ``imager ui``: a thin layer over the inference path.

- :mod:`imager.app.request`: a generation request, its limits and checks.
- :mod:`imager.app.engine`: the job queue, its worker, progress, previews and Stop.
- :mod:`imager.app.history`: the folder of generated PNGs with their parameters.
- :mod:`imager.app.models`: the models offered (files, MLflow runs), loaded lazily and cached.
- :mod:`imager.app.adapters`, :mod:`imager.app.controls`: the LoRA adapters and sketch controls of
  the server's folders, the only files besides the models a request may make it read.
- :mod:`imager.app.api`: the JSON API at ``/api/v1``; :mod:`imager.app.ui`: the Gradio page;
  :mod:`imager.app.server`: both on one FastAPI app, with credentials and limits.

Importing this package loads neither FastAPI nor Gradio.
"""
