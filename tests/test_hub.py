"""Uploads through the real huggingface_hub client against a local fake Hub, and the cards they carry.

The fake Hub (a ThreadingHTTPServer on 127.0.0.1) implements what HfApi.create_repo and
upload_folder call in huggingface_hub 2.4: POST /api/repos/create, /api/validate-yaml (the card's
front matter is parsed with YAML there), /api/models/{repo}/preupload/{rev} (every file answered
"regular", so contents travel base64 in the commit) and /api/models/{repo}/commit/{rev} (NDJSON).
It checks the bearer token on every request and records everything it receives.
"""

import base64
import json
import logging
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from click.testing import CliRunner

import tiny
from mlxlora import LoraConfig, TrainConfig, get_lora_model
from mlxlora.adapters import save_adapter
from mlxlora.cards import adapter_card, card_inputs, front_matter, model_card
from mlxlora.cli import cli
from mlxlora.hub import PUBLIC_JSON, HubError, ensure_card, export_model, folder_kind, upload, upload_after_fuse
from mlxlora.models import load_base
from mlxlora.lora.surgery import adapter_layers
from mlxlora.train import train

TOKEN = "hf_fakeTokenForTests0123456789"
REPO = "alice/devil-lora"
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ROWS = [{"prompt": f"Say {w}.", "completion": f"{w} {w}!"} for w in ["apple", "river", "stone", "cloud", "ember", "frost"]]
ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "loss.png", "mlxlora.json"]


class FakeHub(BaseHTTPRequestHandler):
    """Just enough of the Hub API for HfApi.create_repo + upload_folder; state lives on the server."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        srv = self.server
        srv.requests.append({"method": "POST", "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                             "body": body})
        if self.headers.get("Authorization") != f"Bearer {srv.token}":
            return self._json(401, {"error": "Invalid credentials in Authorization header"})
        parts = self.path.split("?")[0].strip("/").split("/")
        if self.path == "/api/repos/create":
            p = json.loads(body)
            repo = f"{p['organization']}/{p['name']}"
            if repo in srv.repos:
                return self._json(409, {"error": "You already created this model repo", "url": f"{srv.url}/{repo}"})
            srv.repos[repo] = {"create": p, "files": {}}
            return self._json(200, {"url": f"{srv.url}/{repo}"})
        if self.path == "/api/validate-yaml":
            p = json.loads(body)
            try:
                meta = front_matter(p["content"])
            except yaml.YAMLError as e:
                return self._json(400, {"errors": [{"message": str(e)}]})
            srv.validated.append(meta)
            return self._json(200, {"errors": [], "warnings": []})
        if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
            repo = f"{parts[2]}/{parts[3]}"
            if repo not in srv.repos:
                return self._json(404, {"error": "Repository not found"})
            if parts[4] == "preupload":
                files = json.loads(body)["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                  for f in files]})
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            assert lines[0]["key"] == "header"
            commit = {"summary": lines[0]["value"]["summary"], "files": {}}
            for line in lines[1:]:
                assert line["key"] == "file", line  # everything was announced "regular": no LFS entries
                commit["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            srv.repos[repo]["files"].update(commit["files"])
            srv.commits.append(commit)
            oid = f"{len(srv.commits):040x}"
            return self._json(200, {"commitUrl": f"{srv.url}/{repo}/commit/{oid}", "commitOid": oid})
        return self._json(404, {"error": f"fake hub: no route for POST {self.path}"})

    def do_GET(self):
        self.server.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers), "body": b""})
        self._json(404, {"error": f"fake hub: no route for GET {self.path}"})

    def _json(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def hub():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    srv.token, srv.requests, srv.repos, srv.commits, srv.validated = TOKEN, [], {}, [], []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """No real token, login cache, offline flag or cache of the user is seen; the Hub is the fake one."""
    import huggingface_hub.constants as C

    home = tmp_path / "hf-home"
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_XET_CACHE", str(home / "xet"))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(C, "HF_HOME", str(home))
    monkeypatch.setattr(C, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(C, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(C, "AGENT_HARNESSES_PATH", str(home / "agent_harnesses.json"))
    # Anything sent to the default endpoint fails at once on this machine (port 9 refuses) instead of
    # leaving it; e.g. huggingface_hub's user-agent code fetches {ENDPOINT}/api/agent-harnesses once.
    monkeypatch.setattr(C, "ENDPOINT", "http://127.0.0.1:9")
    import huggingface_hub.utils._detect_agent as agents

    monkeypatch.setattr(agents, "_registry", {"standardEnvVars": [], "harnesses": {}}, raising=False)
    return home


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real training run's adapter folder (with checkpoints/), made under a fake home folder."""
    home = tmp_path_factory.mktemp("hub") / "home" / "alice"
    model = tiny.make_model(home / "models" / "tiny-llama", "llama")
    data = tiny.write_data(home / "data", ROWS, ROWS[:2])
    out = home / "runs" / "devil"
    train(TrainConfig(model=str(model), data=str(data), adapter_path=str(out), iters=4, batch_size=2, save_every=2,
                      val_every=2, lora=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])))
    assert (out / "checkpoints").is_dir()
    return home, model, out


@pytest.fixture
def adapter(trained, tmp_path, monkeypatch):
    """A copy of the trained adapter with leftovers that must not be uploaded; HOME is the fake home."""
    home, _, out = trained
    monkeypatch.setenv("HOME", str(home))
    d = tmp_path / "upload" / "devil"
    shutil.copytree(out, d)
    (d / ".tmp-final-4242").mkdir()
    (d / ".tmp-final-4242" / "adapter_model.safetensors").write_bytes(b"half-written")
    (d / ".DS_Store").write_bytes(b"\0")
    (d / "adapter_model.safetensors.tmp").write_bytes(b"partial")
    (d / "notes~").write_text("editor backup")
    return d


def all_text(*folders) -> str:
    """Every file under `folders`, decoded loosely, for looking for the token."""
    out = []
    for folder in folders:
        for f in Path(folder).rglob("*"):
            if f.is_file():
                out.append(f.read_bytes().decode("latin-1"))
    return "\n".join(out)


def test_upload_adapter_through_real_client(hub, hf_env, adapter, trained, monkeypatch, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    url = upload(adapter, REPO, private=True, base_model=BASE_ID, endpoint=hub.url)
    assert url.startswith(f"{hub.url}/{REPO}/commit/")
    assert hub.repos[REPO]["create"] == {"name": "devil-lora", "organization": "alice", "visibility": "private",
                                         "type": "model"}
    assert [r["path"] for r in hub.requests] == ["/api/repos/create", "/api/validate-yaml",
                                                 f"/api/models/{REPO}/preupload/main", f"/api/models/{REPO}/commit/main"]
    assert all(r["headers"]["authorization"] == f"Bearer {TOKEN}" for r in hub.requests)
    files = hub.repos[REPO]["files"]
    assert sorted(files) == ADAPTER_FILES  # no checkpoints/, hidden folder, .DS_Store, *.tmp or backup
    home = trained[0]
    for name, content in files.items():
        if name not in PUBLIC_JSON:
            assert content == (adapter / name).read_bytes(), name
            continue
        text = content.decode()  # the run's local paths stay home; everything else is as written
        assert str(home) not in text and "/alice/" not in text and str(adapter.parent) not in text, name
    rec_up = json.loads(files["mlxlora.json"])["run_record"]
    rec_local = json.loads((adapter / "mlxlora.json").read_text())["run_record"]
    assert rec_local["data"]["train"]["path"] == str(home / "data" / "train.jsonl")  # local file untouched
    assert rec_up["data"]["train"] == dict(rec_local["data"]["train"], path="train.jsonl")
    assert rec_up["base_path"] == "tiny-llama" and rec_up["steps"] == rec_local["steps"]
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == BASE_ID
    assert hub.commits[0]["summary"] == "Upload adapter with mlxlora"

    card = files["README.md"].decode()
    meta = front_matter(card)
    assert hub.validated == [meta]
    assert meta == {"base_model": BASE_ID, "library_name": "peft", "pipeline_tag": "text-generation",
                    "tags": ["mlxlora", "lora", "peft", "mlx"]}
    rec = json.loads((adapter / "mlxlora.json").read_text())["run_record"]
    assert "| rank / alpha | 4 / 8 |" in card and "| target modules | q_proj, v_proj |" in card
    assert f"| optimizer steps | {rec['steps']} |" in card and rec["steps"] == 4
    assert f"| samples | train {len(ROWS)}, valid 2 |" in card
    assert f"{rec['final_val_loss']:.4f}" in card and f"{rec['final_train_loss']:.4f}" in card
    assert f"| trained | {rec['written']} |" in card and f"mlx-lm {rec['versions']['mlx-lm']}" in card
    assert f"mlxlora generate --model {BASE_ID} --adapter {REPO}" in card
    assert f'PeftModel.from_pretrained(base, "{REPO}")' in card and "mlxlora export-adapter adapter --to mlx-lm" in card
    assert str(home) not in card and str(adapter.parent) not in card and "/alice/" not in card
    # the token went only into the Authorization header: no file, card, log line or output holds it
    assert TOKEN not in all_text(adapter, hf_env) + card
    assert TOKEN not in caplog.text and TOKEN not in "".join(capsys.readouterr())


def test_upload_again_public_keeps_users_readme(hub, hf_env, adapter, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    upload(adapter, REPO, endpoint=hub.url)
    assert hub.repos[REPO]["create"]["visibility"] == "public"
    mine = "# My adapter\n\nWritten by hand.\n"
    (adapter / "README.md").write_text(mine)
    upload(adapter, REPO, message="second try", endpoint=hub.url)  # the repo exists: 409 is fine
    assert (adapter / "README.md").read_text() == mine
    assert hub.repos[REPO]["files"]["README.md"].decode() == mine
    assert hub.commits[-1]["summary"] == "second try"


def test_card_is_refreshed_with_repo_id_but_keeps_its_inputs(hub, hf_env, adapter, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert ensure_card(adapter, base_model=BASE_ID)
    before = (adapter / "README.md").read_text()
    assert "<user>/<repo>" in before and card_inputs(before)["base_model"] == BASE_ID
    upload(adapter, REPO, endpoint=hub.url)  # no base_model given now: the card remembers it
    after = (adapter / "README.md").read_text()
    assert "<user>/<repo>" not in after and f"--adapter {REPO}" in after
    assert front_matter(after)["base_model"] == BASE_ID


def test_token_from_login_cache(hub, hf_env, adapter):
    (hf_env / "token").parent.mkdir(parents=True, exist_ok=True)
    (hf_env / "token").write_text(TOKEN)
    upload(adapter, REPO, endpoint=hub.url)
    assert {r["headers"]["authorization"] for r in hub.requests} == {f"Bearer {TOKEN}"}


def test_missing_token_gives_login_hint(hub, hf_env, adapter):
    with pytest.raises(HubError, match="hf auth login") as e:
        upload(adapter, REPO, endpoint=hub.url)
    assert "HF_TOKEN" in str(e.value) and "\n" not in str(e.value)
    assert hub.requests == [] and not (adapter / "README.md").exists()


def test_rejected_token_is_one_line_without_the_token(hub, hf_env, adapter):
    wrong = "hf_wrongTokenXYZ987654321"
    with pytest.raises(HubError) as e:
        upload(adapter, REPO, token=wrong, endpoint=hub.url)
    msg = str(e.value)
    assert "401" in msg and "hf auth login" in msg and wrong not in msg and "\n" not in msg
    assert hub.requests[0]["headers"]["authorization"] == f"Bearer {wrong}"


def test_offline_mode_is_one_line(hub, hf_env, adapter, monkeypatch):
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set: unset it to upload"):
        upload(adapter, REPO, token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_bad_repo_id_and_folder(hf_env, adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    for bad in ("devil-lora", "a/b/c", "alice/", "alice/-x"):
        with pytest.raises(HubError, match="user/name"):
            upload(adapter, bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HubError, match="neither adapter_config.json"):
        upload(tmp_path / "empty", REPO)


def test_folder_kinds_and_model_cards(trained, tmp_path):
    _, model, out = trained
    assert folder_kind(out) == "adapter" and folder_kind(model) == "mlx"
    q = tiny.make_model(tmp_path / "q", "qwen2", quantize=4)
    assert folder_kind(q) == "mlx"
    hf = export_model(str(model), tmp_path / "hf")
    assert folder_kind(hf) == "hf"

    card = model_card(q, "mlx", base_model=BASE_ID)
    assert front_matter(card) == {"base_model": BASE_ID, "library_name": "mlx", "pipeline_tag": "text-generation",
                                  "tags": ["mlx", "mlxlora"]}
    assert "4-bit (MLX quantization, group size 32)" in card and 'load("<user>/<repo>")' in card
    card = model_card(hf, "hf", base_model=str(model), repo_id="alice/tiny-hf")
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and "base_model" not in meta
    assert 'AutoModelForCausalLM.from_pretrained("alice/tiny-hf")' in card and str(model) not in card
    with pytest.raises(ValueError, match="kind"):
        model_card(hf, "gguf")


def test_dora_and_peft_only_adapter_cards(tmp_path):
    src = tiny.make_model(tmp_path / "m", "qwen2")
    base = load_base(str(src))
    get_lora_model(base.model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True))
    for _, layer in adapter_layers(base.model):
        layer.lora_b = mx.ones(layer.lora_b.shape) * 0.01
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# base\n")
    d = save_adapter(base.model, tmp_path / "dora", base_model=str(src))
    card = adapter_card(d)
    meta = front_matter(card)  # license read from the local base's card; a local base has no hub id
    assert meta == {"library_name": "peft", "license": "apache-2.0", "pipeline_tag": "text-generation",
                    "tags": ["mlxlora", "lora", "peft", "mlx", "dora"]}
    assert "| method | DoRA |" in card and "| rank / alpha | 2 / 4 |" in card and str(tmp_path) not in card
    assert front_matter(adapter_card(d, base_model="Qwen/Qwen2-0.5B"))["base_model"] == "Qwen/Qwen2-0.5B"
    (d / "mlxlora.json").unlink()  # a folder PEFT wrote: only adapter_config.json to go on
    card = adapter_card(d, license="mit")
    assert front_matter(card)["license"] == "mit" and "| target modules | q_proj |" in card


def test_upload_after_fuse_names_base_and_adapter(hub, hf_env, trained, tmp_path, monkeypatch):
    _, model, out = trained
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fused = tmp_path / "fused"
    shutil.copytree(model, fused)  # stands in for what `mlxlora fuse` writes: an MLX model folder
    upload_after_fuse(fused, "alice/tiny-fused", adapter=out, base_model=BASE_ID, private=True, endpoint=hub.url)
    files = hub.repos["alice/tiny-fused"]["files"]
    assert sorted(files) == sorted(p.name for p in fused.iterdir())
    card = files["README.md"].decode()
    assert front_matter(card)["library_name"] == "mlx" and front_matter(card)["base_model"] == BASE_ID
    assert "| rank / alpha | 4 / 8 |" in card and 'load("alice/tiny-fused")' in card
    assert hub.commits[0]["summary"] == "Upload mlx with mlxlora"


one_line_error = tiny.one_line_error


def test_cli_upload(hub, hf_env, adapter, monkeypatch):
    import huggingface_hub.constants as C

    monkeypatch.setattr(C, "ENDPOINT", hub.url)  # what HF_ENDPOINT sets when huggingface_hub is imported
    runner = CliRunner()
    res = runner.invoke(cli, ["upload", str(adapter), "--repo", REPO], catch_exceptions=False)
    one_line_error(res, "no Hugging Face token", "hf auth login", "HF_TOKEN")
    assert hub.requests == []
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    res = runner.invoke(cli, ["upload", str(adapter), "--repo", REPO, "--private", "--message", "v1",
                              "--base-model", BASE_ID], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert f"{hub.url}/{REPO}/commit/" in res.output and TOKEN not in res.output
    assert hub.repos[REPO]["create"]["visibility"] == "private" and hub.commits[0]["summary"] == "v1"
    assert sorted(hub.repos[REPO]["files"]) == ADAPTER_FILES
    one_line_error(runner.invoke(cli, ["upload", str(adapter), "--repo", "nouser"]), "user/name")


def test_cli_fuse_upload_chains_the_real_fuse(hub, hf_env, trained, tmp_path, monkeypatch):
    """`mlxlora fuse --upload` fuses, then uploads exactly the folder it wrote."""
    import huggingface_hub.constants as C

    _, model, out = trained
    monkeypatch.setattr(C, "ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    fused = tmp_path / "fused"
    res = CliRunner().invoke(cli, ["fuse", "--model", str(model), "--adapter", str(out), "--out", str(fused),
                                   "--upload", "alice/fused-cli", "--private"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    files = hub.repos["alice/fused-cli"]["files"]
    assert sorted(files) == sorted(p.name for p in fused.iterdir())
    assert "fuse_report.json" in files and "README.md" in files
    home = str(trained[0])
    assert home in (fused / "fuse_report.json").read_text()  # the local report keeps its paths
    assert all(home not in content.decode("latin-1") for content in files.values())  # no local paths leave
    assert front_matter(files["README.md"].decode())["library_name"] == "mlx"
    assert hub.repos["alice/fused-cli"]["create"]["visibility"] == "private"
