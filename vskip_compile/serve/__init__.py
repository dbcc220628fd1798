"""`vskip serve`: an OpenAI-compatible chat endpoint for a VLM under a skip plan, on Ray Serve.

    from vskip_compile.serve.app import ServeOptions, start, stop   # needs the `serve` extra
    url = start(ServeOptions(model_dir="DIR", plan=plan.to_dict(), engine="inductor"), port=8000)

Modules: `request` (parsing, limits, 4xx errors; no Ray, no torch), `engine` (model, processor,
per-layout groups; no Ray), `app` (the Ray Serve deployment, batching, metrics, start/stop).
"""

from .request import Chat, Limits, RequestError, parse_chat

__all__ = ["Chat", "Limits", "RequestError", "parse_chat"]
