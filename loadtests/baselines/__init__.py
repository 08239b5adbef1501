"""Servers we measure ourselves against: a hand-written FastAPI server and LitServe, same model and code."""
