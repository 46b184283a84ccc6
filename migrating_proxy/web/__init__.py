"""The web console and its JSON API: `migrating-proxy web`, a process of its own.

Layers, one concern each:

- `server.py`: the process. Binds the socket, runs uvicorn (its own asyncio loop: the console
  never shares a reactor with relayed mail), TLS from `[tls]`.
- `app.py`: the FastAPI application: routers, static files, security headers, error mapping.
- `console.py`: what every request needs (configuration, store, vault, hasher, throttle).
- `auth.py`: who is asking (session cookie or API token), CSRF, login and logout.
- `api.py`: `/api/v1`, the JSON API the pages use; each route calls `migrating_proxy.admin`,
  exactly what the CLI calls, and answers with the same keys as the CLI's `--json`.
- `pages.py` + `templates/` + `static/`: server-rendered pages and one small script that fills
  and refreshes them from the API. No build step.
"""
