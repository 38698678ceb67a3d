"""``reid-app serve``: the web page and the versioned HTTP API (``/api/v1``) over the same store,
index and embedder as the CLI. Routes parse requests and present results; every use case is a
Pipeline function (:mod:`reid_app.search`, :mod:`reid_app.overview`, :mod:`reid_app.identities`).

- :mod:`.state`: what is loaded once per process (models, database, index) and how threads share it.
- :mod:`.security`: access token, Host and origin checks, upload size limit, response headers (and
  the list of every rule, with why).
- :mod:`.limits`: connection and request limits: timeouts, connection cap, the queue of heavy requests.
- :mod:`.app`: the FastAPI application (routes, error mapping, static page).
"""
