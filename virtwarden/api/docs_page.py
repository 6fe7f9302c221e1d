"""``/docs``: the API's reference as one self-contained HTML page, rendered from its OpenAPI
schema on the server. Nothing is fetched from elsewhere (FastAPI's own pages load their
scripts and styles from a CDN, which a management network without Internet access never
reaches). The machine-readable schema stays at ``/openapi.json``."""
from __future__ import annotations

import json
from html import escape
from typing import Any

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 60em; padding: 0 1em; color: #222; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { margin-bottom: .2em; }
code, pre { font: 13px ui-monospace, monospace; background: #f4f4f4; padding: .1em .3em; }
pre { padding: .6em; overflow-x: auto; } .method { font-weight: bold; text-transform: uppercase; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: .2em .5em; text-align: left; }
"""


def render(schema: dict[str, Any]) -> str:
    info = schema.get("info", {})
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(info.get('title', 'API'))}"
             f"</title><style>{_STYLE}</style></head><body>",
             f"<h1>{escape(info.get('title', 'API'))} API {escape(str(info.get('version', '')))}</h1>",
             f"<p>{escape(info.get('description', ''))}</p>",
             "<p>The schema itself: <a href='/openapi.json'>/openapi.json</a>.</p>"]
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            parts.append(f"<h3 id='{escape(method + path)}'><span class='method'>{escape(method)}</span> "
                         f"<code>{escape(path)}</code></h3>")
            if op.get("description") or op.get("summary"):
                parts.append(f"<p>{escape(op.get('description') or op.get('summary'))}</p>")
            params = op.get("parameters", [])
            if params:
                parts.append("<table><tr><th>parameter</th><th>in</th><th>required</th><th>type</th></tr>")
                for p in params:
                    parts.append(f"<tr><td><code>{escape(p.get('name', ''))}</code></td>"
                                 f"<td>{escape(p.get('in', ''))}</td><td>{'yes' if p.get('required') else 'no'}</td>"
                                 f"<td>{escape(_type(p.get('schema', {})))}</td></tr>")
                parts.append("</table>")
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body:
                parts.append(f"<p>Body: {escape(_type(body))}</p>")
            codes = ", ".join(f"{escape(code)} {escape(r.get('description', ''))}"
                              for code, r in op.get("responses", {}).items())
            parts.append(f"<p>Answers: {codes}</p>")
    models = schema.get("components", {}).get("schemas", {})
    if models:
        parts.append("<h2>Models</h2>")
        for name, model in models.items():
            parts.append(f"<h3 id='{escape(name)}'>{escape(name)}</h3>")
            if model.get("description"):
                parts.append(f"<p>{escape(model['description'])}</p>")
            parts.append(f"<pre>{escape(json.dumps(model.get('properties', model), indent=1))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _type(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " or ".join(_type(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list of {_type(schema.get('items', {}))}"
    return str(schema.get("type", "object"))
