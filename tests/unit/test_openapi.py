"""docs/openapi.yaml (the worker) and docs/openapi-trainer.yaml (the trainer) against the code they describe.

Three checks per document, none of which copies a list of routes:

1. **Routes.** The (method, path) pairs the server code registers equal the document's. The worker's come from
   a real Faust app on which ``Worker._add_views`` registers its views (the aiohttp router then lists them);
   the trainer's from ``trainer/service.py``'s source: the paths ``TrainerHttp.answer`` compares the request
   path with, and the ``do_<METHOD>`` handlers its request handler defines.
2. **Parameters.** Every query parameter and header a handler reads (``query.get("k")``,
   ``request.headers.get("Authorization")``, found in the source of the view and of the worker methods it
   calls) and every path parameter of a route is documented on that route, and nothing else is; a route that
   checks the bearer token, and only such a route, declares the ``bearerAuth`` security scheme.
3. **A running server.** Both servers start in-process without a broker: the worker's real views and request
   handlers (``Worker.health``, ``Worker.answer``, ...) bound to a worker whose Kafka-facing parts are stubs,
   served by aiohttp on a free port; the trainer's ``TrainerHttp`` itself. Each answer's status must be one the
   document lists for the route, and a JSON answer must have the documented schema's required fields and no
   undocumented ones.
"""

from __future__ import annotations

import ast
import asyncio
import json
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
WORKER_DOC = REPO / "docs" / "openapi.yaml"
TRAINER_DOC = REPO / "docs" / "openapi-trainer.yaml"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
TOKEN = "s3cret"


# ----- the documents ------------------------------------------------------------------------------------------
def load(doc: Path) -> dict[str, Any]:
    return yaml.safe_load(doc.read_text())


def documented_routes(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item if method in HTTP_METHODS}


def operation(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return doc["paths"][path][method.lower()]


def documented_params(doc: dict[str, Any], method: str, path: str) -> set[tuple[str, str]]:
    """(in, name) of the operation's parameters, path-level ones included."""
    params = [*doc["paths"][path].get("parameters", []), *operation(doc, method, path).get("parameters", [])]
    return {(p["in"], p["name"]) for p in params}


def guarded(doc: dict[str, Any], method: str, path: str) -> bool:
    """Whether the operation declares the bearer token (``bearerAuth``) among its security requirements."""
    security = operation(doc, method, path).get("security", doc.get("security", []))
    return any("bearerAuth" in requirement for requirement in security)


def resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = doc
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


JSON_TYPES = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool}


def check_json(doc: dict[str, Any], schema: dict[str, Any], value: Any, where: str) -> None:
    """The parts of a schema the documents use: type, nullable, required, properties (no others), items, enum."""
    schema = resolve(doc, schema)
    if value is None:
        assert schema.get("nullable"), f"{where}: null, but the schema is not nullable"
        return
    kind = schema.get("type")
    if kind:
        assert isinstance(value, JSON_TYPES[kind]) and not (kind != "boolean" and isinstance(value, bool)), (
            f"{where}: {value!r} is not {kind}")
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if kind == "object" and "properties" in schema:
        missing = set(schema.get("required", [])) - set(value)
        assert not missing, f"{where}: required fields missing: {sorted(missing)}"
        extra = set(value) - set(schema["properties"])
        assert not extra, f"{where}: fields the document does not describe: {sorted(extra)}"
        for key, item in value.items():
            check_json(doc, schema["properties"][key], item, f"{where}.{key}")
    if kind == "array" and "items" in schema:
        for i, item in enumerate(value):
            check_json(doc, schema["items"], item, f"{where}[{i}]")


def check_answer(doc: dict[str, Any], method: str, path: str, status: int, content_type: str, body: bytes) -> None:
    responses = operation(doc, method, path)["responses"]
    assert str(status) in responses, f"{method} {path} answered {status}, which the document does not list"
    content = responses[str(status)].get("content", {})
    media = content_type.split(";")[0].strip()
    assert media in content, f"{method} {path} {status}: {media} is not a documented content type ({list(content)})"
    if media == "application/json":
        check_json(doc, content[media]["schema"], json.loads(body), f"{method} {path} {status}")


# ----- what the code reads -------------------------------------------------------------------------------------
def _functions(cls: ast.ClassDef) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    return {f.name: f for f in cls.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _calls_on(node: ast.AST, receiver: str) -> set[str]:
    """Names of the methods called as ``receiver.name(...)`` anywhere under ``node``."""
    return {n.func.attr for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and isinstance(n.func.value, ast.Name) and n.func.value.id == receiver}


def _reads(node: ast.AST) -> set[tuple[str, str]]:
    """("query", name) for ``query.get("name")`` / ``request.query.get("name")``, ("header", name) for
    ``request.headers.get("name")`` / ``self.headers.get("name")``."""
    found = set()
    for n in ast.walk(node):
        if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get" and n.args
                and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str)):
            continue
        target = n.func.value
        name = target.attr if isinstance(target, ast.Attribute) else target.id if isinstance(target, ast.Name) else ""
        if name == "query":
            found.add(("query", n.args[0].value))
        elif name == "headers":
            found.add(("header", n.args[0].value))
    return found


def worker_views_in_source() -> dict[str, dict[str, Any]]:
    """Per path that ``Worker._add_views`` registers (``app.page(path)(ViewClass)``): the HTTP methods its view
    class defines, the path parameters of those methods, the (in, name) parameters the view and the worker
    methods it calls read, and whether it checks the bearer token (calls ``worker.authorised``)."""
    tree = ast.parse((REPO / "stream" / "worker.py").read_text())
    worker = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Worker")
    methods = _functions(worker)
    add_views = methods["_add_views"]
    classes = {c.name: c for c in ast.walk(add_views) if isinstance(c, ast.ClassDef)}
    views = {}
    for n in ast.walk(add_views):
        if (isinstance(n, ast.Call) and isinstance(n.func, ast.Call) and isinstance(n.func.func, ast.Attribute)
                and n.func.func.attr == "page"):
            views[n.func.args[0].value] = classes[n.args[0].id]
    out = {}
    for path, cls in views.items():
        handlers = {name: f for name, f in _functions(cls).items() if name in HTTP_METHODS}
        called, todo = set(), set().union(*(_calls_on(f, "worker") for f in handlers.values()))
        while todo:  # the worker methods the view calls, and those they call on self
            name = todo.pop()
            if name in methods and name not in called:
                called.add(name)
                todo |= _calls_on(methods[name], "self")
        reads = set().union(*(_reads(f) for f in handlers.values()), *(_reads(methods[m]) for m in called))
        path_params = {("path", a.arg) for f in handlers.values() for a in f.args.args[2:]}  # after self, request
        out[path] = {"methods": {m.upper() for m in handlers}, "params": reads | path_params,
                     "guarded": "authorised" in called}
    return out


def trainer_routes_in_source() -> tuple[set[tuple[str, str]], set[str], set[tuple[str, str]]]:
    """(routes, guarded paths, (in, name) parameters its handler reads) of ``trainer/service.py``'s TrainerHttp:
    the paths ``answer`` compares ``path`` with, the methods its handler defines as ``do_<METHOD>`` functions
    (the refusing ones are assignments), and ``GUARDED``."""
    tree = ast.parse((REPO / "trainer" / "service.py").read_text())
    http = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainerHttp")
    answer = _functions(http)["answer"]
    paths = {c.comparators[0].value for c in ast.walk(answer) if isinstance(c, ast.Compare)
             and isinstance(c.left, ast.Name) and c.left.id == "path" and isinstance(c.ops[0], ast.Eq)}
    handler = next(c for c in ast.walk(_functions(http)["_handler"]) if isinstance(c, ast.ClassDef))
    verbs = {name.removeprefix("do_") for name in _functions(handler) if name.startswith("do_")}
    guarded_paths: set[str] = set()
    for n in http.body:
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "GUARDED" for t in n.targets):
            guarded_paths = {c.value for c in ast.walk(n.value) if isinstance(c, ast.Constant)}
    return {(v, p) for v in verbs for p in paths}, guarded_paths, _reads(handler)


# ----- routes and parameters -------------------------------------------------------------------------------------
def worker_app(tmp_path: Path) -> Any:
    """A worker's Faust app with the worker's own views on it, built as ``Worker._build_app`` does minus the
    broker-facing tasks; ``stub`` is the object the views call (set up by :func:`stub_worker`)."""
    from stream.worker import Worker, _ServiceHost

    app = _ServiceHost("openapi-check", broker="kafka://127.0.0.1:1", store="memory://", web_enabled=True,
                       web_port=6066, web_bind="127.0.0.1", datadir=str(tmp_path / "faust"), logging_config=None)
    stub = types.SimpleNamespace()
    Worker._add_views(stub, app)
    return app, stub


def test_the_worker_document_lists_exactly_the_routes_the_worker_registers(tmp_path: Path) -> None:
    app, _ = worker_app(tmp_path)
    registered = {(r.method, r.resource.canonical) for r in app.web.web_app.router.routes()}
    # Faust adds HEAD to every view (a GET without its body); the document says so in its description.
    assert {path for method, path in registered if method == "HEAD"} == {path for _, path in registered}
    assert {r for r in registered if r[0] != "HEAD"} == documented_routes(load(WORKER_DOC))
    source = worker_views_in_source()
    assert {(m, p) for p, v in source.items() for m in v["methods"]} == documented_routes(load(WORKER_DOC))


def test_the_worker_document_gives_each_route_the_parameters_its_handler_reads_and_no_others() -> None:
    doc = load(WORKER_DOC)
    for path, view in worker_views_in_source().items():
        for method in view["methods"]:
            header_reads = {p for p in view["params"] if p[0] == "header"}
            if view["guarded"]:
                assert guarded(doc, method, path), f"{method} {path} checks the bearer token: declare bearerAuth"
                header_reads.discard(("header", "Authorization"))  # documented as the security scheme
            else:
                assert not guarded(doc, method, path), f"{method} {path} does not check the token"
            want = {p for p in view["params"] if p[0] != "header"} | header_reads
            assert documented_params(doc, method, path) == want, f"{method} {path}"
    # the handler does read k and exclude: a parser that found nothing would pass the loop above vacuously
    assert {("query", "k"), ("query", "exclude"), ("path", "user_id")} <= \
        worker_views_in_source()["/recommendations/{user_id}"]["params"]


def test_the_trainer_document_lists_exactly_its_routes_and_guards() -> None:
    doc = load(TRAINER_DOC)
    routes, guarded_paths, reads = trainer_routes_in_source()
    assert routes == documented_routes(doc) and routes
    assert reads == {("header", "Authorization")}  # the token: documented as the security scheme
    for method, path in routes:
        assert guarded(doc, method, path) == (path in guarded_paths), f"{method} {path}"
        assert documented_params(doc, method, path) == set(), f"{method} {path}"


# ----- running servers -------------------------------------------------------------------------------------------
def stub_worker(stub: types.SimpleNamespace, cfg: Any) -> None:
    """The views' ``worker``: the real Worker methods the views call, over stubs of what talks to Kafka."""
    from stream.health import Liveness
    from stream.metrics import WorkerMetrics
    from stream.worker import Worker

    stub.__dict__.update(
        cfg=cfg, metrics=WorkerMetrics(), liveness=Liveness(), started=time.time(), swaps=[],
        processor=types.SimpleNamespace(serving=None, shadow=None, popular_top=lambda k, excluded: ([], [])),
        pipeline=types.SimpleNamespace(ready=threading.Event(), batches=0, assignment={}, behind=lambda p: None),
        store=types.SimpleNamespace(count=lambda: 0))
    for name in ("health", "assigned", "pending", "answer", "_unavailable", "authorised"):
        setattr(stub, name, types.MethodType(getattr(Worker, name), stub))


def test_a_running_worker_answers_as_documented(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aiohttp import ClientSession
    from aiohttp.test_utils import TestServer

    from lrustream.kernel.config import load_config

    doc = load(WORKER_DOC)
    cfg = load_config(overrides=[f"http.token={TOKEN}"])
    app, stub = worker_app(tmp_path)
    stub_worker(stub, cfg)
    refreshes: list[str] = []
    monkeypatch.setattr("stream.updates.request_refresh", lambda cfg, by: refreshes.append(by))
    served = types.SimpleNamespace(version="v000002", num_items=3, model=types.SimpleNamespace(name="lrurec"))
    seen: set[tuple[str, str, int]] = set()

    async def ask(session: Any, server: Any, method: str, route: str, url: str, **kwargs: Any) -> int:
        async with session.request(method, server.make_url(url), allow_redirects=False, **kwargs) as response:
            body = await response.read()
            check_answer(doc, method, route, response.status, response.headers.get("Content-Type", ""), body)
            if response.status == 503 and route.startswith("/recommendations"):
                assert response.headers["Retry-After"] == "1"
            seen.add((method, route, response.status))
            return response.status

    async def main() -> None:
        server = TestServer(app.web.web_app, host="127.0.0.1", port=0)
        await server.start_server()
        try:
            async with ClientSession() as session:
                rec = "/recommendations/{user_id}"
                # before any model version: waiting, and no one can answer
                assert await ask(session, server, "GET", "/health", "/health") == 503
                assert await ask(session, server, "GET", rec, "/recommendations/42") == 503
                assert await ask(session, server, "GET", "/model", "/model") == 200
                assert await ask(session, server, "GET", "/metrics", "/metrics") == 200
                assert await ask(session, server, "POST", "/refresh", "/refresh") == 401
                assert await ask(session, server, "POST", "/refresh", "/refresh",
                                 headers={"Authorization": f"Bearer {TOKEN}"}) == 202
                # serving, with its first assignment restored
                stub.processor.serving = served
                stub.pipeline.ready.set()
                stub.swaps.append({"version": "v000002", "ok": True, "previous": "v000001", "seconds": 0.2,
                                   "at": time.time()})
                stub.swaps.append({"version": "v000003", "ok": False, "reason": "checksum", "retry": False,
                                   "at": time.time()})
                assert await ask(session, server, "GET", "/health", "/health") == 200
                assert await ask(session, server, "GET", "/model", "/model") == 200
                assert await ask(session, server, "GET", rec, "/recommendations/42?k=0") == 400
                assert await ask(session, server, "GET", rec, "/recommendations/42?k=two&exclude=1,2") == 400
                async with session.get(server.make_url("/refresh")) as response:
                    assert response.status == 405  # a method the document does not list is refused
        finally:
            await server.close()

    asyncio.run(main())
    assert refreshes == ["http"]
    assert {(m, r) for m, r, _ in seen} == documented_routes(doc)  # every documented route was exercised


def test_a_running_trainer_answers_as_documented() -> None:
    from trainer.online import TrainerLoop
    from trainer.page import render_page
    from trainer.service import TrainerHealth, TrainerHttp, TrainerMetrics

    doc = load(TRAINER_DOC)
    loop = types.SimpleNamespace(health=TrainerHealth(), metrics=TrainerMetrics(), lag=None,
                                 learner=types.SimpleNamespace(version="v000004"),
                                 buffer=types.SimpleNamespace(new_events=12, users={"u1": None}))
    health = types.MethodType(TrainerLoop.health_report, loop)
    http = TrainerHttp("127.0.0.1", 0, TOKEN, health, TrainerMetrics().render,
                       lambda: render_page({"serving": "v000004", "rounds": []})).start()

    def ask(method: str, path: str, token: str | None = None) -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{http.port}{path}", method=method,
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                status, ctype, body = response.status, response.headers["Content-Type"], response.read()
        except urllib.error.HTTPError as exc:
            status, ctype, body = exc.code, exc.headers["Content-Type"], exc.read()
        if (method.upper(), path) in documented_routes(doc):
            check_answer(doc, method, path, status, ctype, body)
        return status

    try:
        assert ask("GET", "/health") == 200
        assert ask("GET", "/metrics") == 401
        assert ask("GET", "/metrics", TOKEN) == 200
        assert ask("GET", "/") == 401
        assert ask("GET", "/", TOKEN) == 200
        loop.health.round_failed(RuntimeError("boom"))
        assert ask("GET", "/health") == 503
        assert ask("GET", "/elsewhere") == 404  # the document says any other path is 404 ...
        assert ask("POST", "/health") == 405  # ... and any other method 405
    finally:
        http.close()
