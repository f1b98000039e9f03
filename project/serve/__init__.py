"""Serving a loaded model: the Gradio page, the OpenAI-compatible API, and the one server that holds both. Import
from the modules themselves."""
