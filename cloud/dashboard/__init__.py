"""The operator dashboard served by ``edgectl serve`` under ``/ui/`` (``/`` redirects there).

Server-rendered pages (Jinja2, autoescaped) with one small hand-written script for live updates
over server-sent events, the log tail and confirmations; the templates, the stylesheet and the
script ship in this package (nothing from a CDN; it works air-gapped). Browsers log in with an
operator token for a session cookie (``session.py``); the REST API's bearer-token check does not
apply under ``/ui/`` (``is_dashboard_path``), the session check does.
"""
