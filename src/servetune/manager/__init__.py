"""The manager: the FastAPI app that owns studies, places their trials on workers through Redis,
ingests results and serves live views."""
