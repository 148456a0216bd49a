"""The ingress's FastAPI app without Serve: CORS off unless configured, the web page's mount point, auth."""
from __future__ import annotations

from fastapi.testclient import TestClient

from serve.config import ServeConfig
from serve.ingress import ChatIngress

ORIGIN = "https://chat.example.com"


def app_for(**config) -> TestClient:
    ingress = ChatIngress(ServeConfig(**config), model=None)  # routes that reach the model are not called here
    return TestClient(ingress.__serve_build_asgi_app__())


def test_cors_is_off_unless_origins_are_configured():
    plain = app_for().get("/health", headers={"Origin": ORIGIN})
    assert plain.status_code == 200 and "access-control-allow-origin" not in plain.headers
    client = app_for(cors_origins=[ORIGIN])
    assert client.get("/health", headers={"Origin": ORIGIN}).headers["access-control-allow-origin"] == ORIGIN
    other = client.get("/health", headers={"Origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in other.headers
    preflight = client.options("/v1/chat/completions", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                                                "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200


def test_static_files_mount_below_the_api(tmp_path):
    (tmp_path / "index.html").write_text("<html>chat</html>")
    client = app_for(web_dir=str(tmp_path), api_key="k")
    assert client.get("/").text == "<html>chat</html>"  # the page itself needs no key
    assert client.get("/health").json() == {"status": "ok"}  # API routes win over the mount
    assert client.get("/v1/models").status_code == 401
    assert "raylens chat" in app_for().get("/").text  # no web_dir: the shipped page (serve/web/)
    assert app_for(web_page=False).get("/").status_code == 404  # web_page: false: nothing at /


def test_unauthorised_chat_is_refused_before_reading_the_body():
    client = app_for(api_key="k")
    response = client.post("/v1/chat/completions", content=b"{}", headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["www-authenticate"] == "Bearer"
