"""Checks on the rendered Kubernetes manifests and on the Dockerfile conventions they use.

Run through deploy/validate.sh, which renders every kustomization once and passes the
directory in EE_DEPLOY_RENDERED. Run alone (`pytest deploy/tests`), the tests render with
the `kubectl` on PATH (or $KUBECTL).
"""

from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import pathlib
import re
import shutil
import subprocess
import threading
import urllib.parse

import pytest
import yaml

DEPLOY = pathlib.Path(__file__).resolve().parents[1]
K8S = DEPLOY / "kubernetes"

# Rendered name -> kustomization directory under deploy/kubernetes.
WORKLOADS = {
    "base": "base",
    "example": "overlays/example",
    "example-pre-1.29": "overlays/example-pre-1.29",
    "example-redis": "overlays/example-redis",
}
NATIVE_SIDECAR = ["base", "example", "example-redis"]
# The variants whose state is a directory on a volume (example-redis keeps it in Redis).
DIR_STATE = ["base", "example", "example-pre-1.29"]
LEGACY = ["example-pre-1.29"]
JOB = "set-authserver"

SIDECAR = "ee-auth-sidecar"
EMAILENGINE = "emailengine"
DEFAULT_AUTH_PATH = "/authentication"  # the binary's --path default
PROBE_TIMEOUT_S = 2  # `ee-auth-sidecar probe` gives up after 2 s
PREWARM_TIMEOUT_S = 20  # --prewarm-timeout default: /readyz can take this long
# Volume types Pod Security "restricted" allows.
PSS_RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
    "persistentVolumeClaim", "projected", "secret",
}
# EmailEngine takes the Basic user and password from the URL without percent-decoding.
BASIC_CHARSET = re.compile(r"^[A-Za-z0-9._~-]+$")


# --- rendering --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def render(name: str) -> tuple:
    pre = os.environ.get("EE_DEPLOY_RENDERED")
    if pre:
        text = (pathlib.Path(pre) / f"{name}.yaml").read_text()
    else:
        directory = K8S / (WORKLOADS.get(name) or name)
        kubectl = os.environ.get("KUBECTL", "kubectl")
        text = subprocess.run(
            [kubectl, "kustomize", str(directory)], check=True, capture_output=True, text=True
        ).stdout
    return tuple(d for d in yaml.safe_load_all(text) if d)


def objects(name: str, kind: str) -> list[dict]:
    return [d for d in render(name) if d["kind"] == kind]


def the(name: str, kind: str, obj_name: str | None = None) -> dict:
    found = [d for d in objects(name, kind) if obj_name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{name}: expected one {kind} {obj_name or ''}, found {len(found)}"
    return found[0]


def pod_spec(name: str) -> dict:
    kind = "Job" if name == JOB else "Deployment"
    return the(name, kind)["spec"]["template"]["spec"]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec.get("containers", [])


def container(spec: dict, cname: str) -> dict:
    found = [c for c in containers(spec) if c["name"] == cname]
    assert len(found) == 1, f"expected one container {cname}, found {len(found)}"
    return found[0]


def flag(c: dict, name: str) -> str | None:
    """Value of --name from args (`--name=v` or `--name v`), else from EE_AUTH_<NAME>."""
    argv = c.get("command", []) + c.get("args", [])
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
    env_name = "EE_AUTH_" + name.upper().replace("-", "_")
    for e in c.get("env", []):
        if e["name"] == env_name:
            return e.get("value")
    return None


def sidecar_listen(spec: dict) -> tuple[str, int]:
    listen = flag(container(spec, SIDECAR), "listen")
    assert listen, "the sidecar's --listen must be explicit"
    host, _, port = listen.rpartition(":")
    return host, int(port)


def mount_for(spec: dict, c: dict, path: str) -> tuple[dict, dict]:
    """The volumeMount of container c at exactly `path`, and its volume."""
    mounts = [m for m in c.get("volumeMounts", []) if m["mountPath"].rstrip("/") == path]
    assert len(mounts) == 1, f"{c['name']}: expected one volume mounted at {path}"
    volume = [v for v in spec.get("volumes", []) if v["name"] == mounts[0]["name"]]
    assert len(volume) == 1, f"no volume {mounts[0]['name']}"
    return mounts[0], volume[0]


def secret_data(name: str, secret_name: str) -> dict[str, str]:
    secret = the(name, "Secret", secret_name)
    data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    data.update(secret.get("stringData", {}))
    return data


def dockerfile_final_stage() -> list[str]:
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    instructions = [ln for ln in lines if ln and not ln.startswith("#") and not ln.startswith(" ")]
    last_from = max(i for i, ln in enumerate(instructions) if ln.upper().startswith("FROM "))
    return instructions[last_from:]


def dockerfile_entrypoint() -> list[str]:
    entry = [ln for ln in dockerfile_final_stage() if ln.startswith("ENTRYPOINT ")]
    assert len(entry) == 1
    return json.loads(entry[0].split(" ", 1)[1])


def resolve_secret_file(config_path: str, file: str) -> str:
    """Where the sidecar reads a `{"file": ...}` secret: relative to the config's directory."""
    return os.path.normpath(os.path.join(os.path.dirname(config_path), file))


def secret_refs(value, path="") -> list[tuple[str, str, str]]:
    """Every `{"file": ...}` / `{"env": ...}` secret of a config: (JSON path, kind, value)."""
    found = []
    if isinstance(value, dict):
        if set(value) in ({"file"}, {"env"}):
            (kind, ref), = value.items()
            return [(path, kind, ref)]
        for k, v in value.items():
            found += secret_refs(v, f"{path}.{k}" if path else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += secret_refs(v, f"{path}[{i}]")
    return found


ALL_PODS = list(WORKLOADS) + [JOB]
ALL_CONTAINERS = [
    pytest.param(name, c["name"], id=f"{name}/{c['name']}")
    for name in ALL_PODS
    for c in containers(pod_spec(name))
]


# --- workload shape ---------------------------------------------------------------------

@pytest.mark.parametrize("name", list(WORKLOADS))
def test_single_emailengine_recreated_never_surged(name):
    deployment = the(name, "Deployment", EMAILENGINE)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


@pytest.mark.parametrize("name", NATIVE_SIDECAR)
def test_sidecar_is_native_sidecar_started_first(name):
    spec = pod_spec(name)
    init = spec.get("initContainers", [])
    assert init and init[0]["name"] == SIDECAR, "the sidecar must be the first init container"
    assert init[0].get("restartPolicy") == "Always"
    assert SIDECAR not in [c["name"] for c in spec["containers"]]
    assert [c["name"] for c in spec["containers"]] == [EMAILENGINE]


@pytest.mark.parametrize("name", LEGACY)
def test_pre_129_variant_runs_sidecar_as_regular_container(name):
    spec = pod_spec(name)
    assert not [c for c in spec.get("initContainers", []) if c.get("restartPolicy")]
    names = [c["name"] for c in spec["containers"]]
    assert SIDECAR in names and EMAILENGINE in names
    assert "restartPolicy" not in container(spec, SIDECAR)


# --- Pod Security "restricted" ----------------------------------------------------------

@pytest.mark.parametrize("name,cname", ALL_CONTAINERS)
def test_container_meets_pss_restricted(name, cname):
    spec = pod_spec(name)
    pod_sc = spec.get("securityContext", {})
    sc = container(spec, cname).get("securityContext", {})

    def effective(key):
        return sc.get(key, pod_sc.get(key))

    assert effective("runAsNonRoot") is True
    assert effective("runAsUser") != 0
    assert sc.get("allowPrivilegeEscalation") is False
    assert sc.get("privileged") is not True
    assert sc.get("capabilities", {}).get("drop") == ["ALL"]
    assert not sc.get("capabilities", {}).get("add")
    assert (effective("seccompProfile") or {}).get("type") == "RuntimeDefault"
    assert sc.get("readOnlyRootFilesystem") is True


@pytest.mark.parametrize("name", ALL_PODS)
def test_pod_meets_pss_restricted(name):
    spec = pod_spec(name)
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key), key
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        assert kinds <= PSS_RESTRICTED_VOLUMES, f"volume {volume['name']}: {kinds}"
    # Nothing in these pods calls the Kubernetes API.
    assert spec.get("automountServiceAccountToken") is False


@pytest.mark.parametrize("name,cname", ALL_CONTAINERS)
def test_container_has_requests_and_memory_limit(name, cname):
    resources = container(pod_spec(name), cname).get("resources", {})
    assert {"cpu", "memory"} <= set(resources.get("requests", {}))
    assert "memory" in resources.get("limits", {})


def test_example_namespace_enforces_restricted():
    labels = the("example", "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


# --- sidecar config, state, network -----------------------------------------------------

@pytest.mark.parametrize("name", ALL_PODS)
def test_no_subpath_mounts(name):
    """subPath mounts never see Secret updates; the config must hot-reload."""
    for c in containers(pod_spec(name)):
        for m in c.get("volumeMounts", []):
            assert "subPath" not in m and "subPathExpr" not in m, f"{c['name']}: {m}"


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_config_is_a_file_in_a_secret_mounted_as_directory(name):
    spec = pod_spec(name)
    sidecar = container(spec, SIDECAR)
    config = flag(sidecar, "config")
    assert config, "the sidecar's --config must be explicit"
    directory, key = config.rsplit("/", 1)
    mount, volume = mount_for(spec, sidecar, directory)
    assert "subPath" not in mount
    assert mount.get("readOnly") is True
    assert "secret" in volume, "the config must come from a Secret"
    items = volume["secret"].get("items")
    assert items is None or key in [i["key"] for i in items]
    assert volume["secret"].get("optional") is not True
    # The other container has no access to the sidecar's credentials.
    assert volume["name"] not in [
        m["name"] for m in container(spec, EMAILENGINE).get("volumeMounts", [])
    ]


def state_volume(spec: dict) -> tuple[str, dict, dict]:
    """--state-dir, and the mount and volume that hold it."""
    sidecar = container(spec, SIDECAR)
    state = flag(sidecar, "state-dir")
    assert state, "the sidecar's --state-dir must be explicit"
    state = state.rstrip("/")
    holders = [m for m in sidecar.get("volumeMounts", []) if state.startswith(m["mountPath"].rstrip("/") + "/")]
    assert len(holders) == 1, f"--state-dir {state} must lie in exactly one mounted volume"
    _, volume = mount_for(spec, sidecar, holders[0]["mountPath"].rstrip("/"))
    return state, holders[0], volume


@pytest.mark.parametrize("name", DIR_STATE)
def test_state_dir_is_a_subdirectory_of_a_writable_volume(name):
    """A subdirectory, not the mount point: the sidecar chmods its state directory to
    0700, which fails (EPERM) on a volume root owned by root."""
    _, mount, volume = state_volume(pod_spec(name))
    assert not mount.get("readOnly")
    assert {"emptyDir", "persistentVolumeClaim"} & set(volume)


@pytest.mark.parametrize("name", ["example", "example-pre-1.29"])
def test_example_keeps_state_on_a_claim(name):
    _, _, volume = state_volume(pod_spec(name))
    claim = volume["persistentVolumeClaim"]["claimName"]
    assert the(name, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_redis_overlay_keeps_state_in_emailengines_redis_sealed_without_a_claim():
    """State in EmailEngine's Redis (its redis-url Secret key), sealed with a key file from
    a Secret mounted read-only; no --state-dir, no PersistentVolumeClaim."""
    name = "example-redis"
    spec = pod_spec(name)
    sidecar = container(spec, SIDECAR)
    assert not any(a.startswith("--state") for a in sidecar.get("args", []))
    env = {e["name"]: e for e in sidecar.get("env", [])}
    ref = env["EE_AUTH_STATE"]["valueFrom"]["secretKeyRef"]
    emailengine = container(spec, EMAILENGINE)
    ee_ref = {e["name"]: e for e in emailengine["env"]}["EENGINE_REDIS"]["valueFrom"]["secretKeyRef"]
    assert ref == ee_ref, "the sidecar uses EmailEngine's Redis"
    key_file = env["EE_AUTH_STATE_KEY_FILE"]["value"]
    mount = next(m for m in sidecar["volumeMounts"] if key_file.startswith(m["mountPath"] + "/"))
    assert mount.get("readOnly")
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert "secret" in volume
    docs = [d for d in render(name) if d]
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert not any("persistentVolumeClaim" in v for v in spec["volumes"])


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_sidecar_listens_on_loopback_only(name):
    spec = pod_spec(name)
    sidecar = container(spec, SIDECAR)
    host, _ = sidecar_listen(spec)
    assert host == "127.0.0.1"
    argv = sidecar.get("command", []) + sidecar.get("args", [])
    assert not [a for a in argv if a.startswith("--allow-remote")]
    assert not [e for e in sidecar.get("env", []) if e["name"] == "EE_AUTH_ALLOW_REMOTE"]
    assert not sidecar.get("ports"), "a loopback listener has no container port"


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_no_service_exposes_the_sidecar(name):
    _, port = sidecar_listen(pod_spec(name))
    for service in objects(name, "Service"):
        for p in service["spec"]["ports"]:
            assert port not in (p.get("port"), p.get("targetPort"))


# --- probes -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(WORKLOADS))
def test_sidecar_probes_exec_the_binary_over_loopback(name):
    spec = pod_spec(name)
    sidecar = container(spec, SIDECAR)
    _, port = sidecar_listen(spec)
    binary = dockerfile_entrypoint()[0]
    expected = {
        "startupProbe": "/readyz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    for kind, path in expected.items():
        probe = sidecar.get(kind)
        assert probe, f"missing {kind}"
        # httpGet would connect to the pod IP, where nothing listens.
        assert "httpGet" not in probe and "tcpSocket" not in probe
        assert probe["exec"]["command"] == [binary, "probe", f"http://127.0.0.1:{port}{path}"]
        # The kubelet's timeout must outlast the probe's own, so failures are reported
        # by the probe (exit 1) rather than by a killed process.
        assert probe.get("timeoutSeconds", 1) > PROBE_TIMEOUT_S
    startup = sidecar["startupProbe"]
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget > PREWARM_TIMEOUT_S, "the startup probe must outlast pre-warm"


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_emailengine_has_probes(name):
    ee = container(pod_spec(name), EMAILENGINE)
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert ee.get(kind), f"missing {kind}"
    assert ee["readinessProbe"]["httpGet"]["path"] == "/health"


# --- authServer -------------------------------------------------------------------------

def _job_env() -> dict[str, dict]:
    return {e["name"]: e for e in container(pod_spec(JOB), "set-authserver")["env"]}


def test_job_points_authserver_at_sidecar_on_loopback():
    env = _job_env()
    url = urllib.parse.urlsplit(env["AUTH_SERVER_URL"]["value"])
    sidecar_spec = pod_spec("base")
    _, port = sidecar_listen(sidecar_spec)
    path = flag(container(sidecar_spec, SIDECAR), "path") or DEFAULT_AUTH_PATH
    assert url.scheme == "http"
    assert url.hostname == "127.0.0.1"
    assert url.port == port
    assert url.path == path
    # Credentials come from the variables below, expanded by the kubelet.
    assert (url.username, url.password) == ("$(AUTH_USER)", "$(AUTH_PASSWORD)")
    names = list(env)
    assert names.index("AUTH_USER") < names.index("AUTH_SERVER_URL")
    assert names.index("AUTH_PASSWORD") < names.index("AUTH_SERVER_URL")
    # The script sends this variable, not a URL of its own.
    script = container(pod_spec(JOB), "set-authserver")["args"][0]
    assert '"$AUTH_SERVER_URL"' in script
    assert "/v1/settings" in script


def test_job_credentials_are_the_sidecar_config_credentials():
    env = _job_env()
    spec = pod_spec("example")
    sidecar = container(spec, SIDECAR)
    config_path = flag(sidecar, "config")
    directory, key = config_path.rsplit("/", 1)
    _, volume = mount_for(spec, sidecar, directory)
    secret_name = volume["secret"]["secretName"]
    data = secret_data("example", secret_name)
    config = json.loads(data[key])

    assert env["AUTH_USER"]["value"] == config["auth"]["username"]
    password_file = resolve_secret_file(config_path, config["auth"]["password"]["file"])
    assert password_file.rsplit("/", 1)[0] == directory, "the password file must be in the Secret"
    ref = env["AUTH_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (secret_name, password_file.rsplit("/", 1)[1])
    assert BASIC_CHARSET.match(config["auth"]["username"])
    assert BASIC_CHARSET.match(data[ref["key"]]), "placeholder must follow the charset rule"


class _FakeEmailEngine(http.server.BaseHTTPRequestHandler):
    """Records POST /v1/settings the way EmailEngine's API would receive it."""

    received: list = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, dict(self.headers), json.loads(body)))
        payload = b'{"updated":["authServer"]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def _run_job_script(password: str, tmp: pathlib.Path) -> tuple[subprocess.CompletedProcess, list]:
    """Runs the Job's shell script with `sh` against a fake EmailEngine on loopback, with
    the environment the kubelet would give it and `tmp` in place of its /tmp volume."""
    _FakeEmailEngine.received = []
    server = http.server.HTTPServer(("127.0.0.1", 0), _FakeEmailEngine)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        c = container(pod_spec(JOB), "set-authserver")
        env = {e["name"]: e.get("value") for e in c["env"]}
        env.update(
            EMAILENGINE_URL=f"http://127.0.0.1:{server.server_port}",
            AUTH_PASSWORD=password,
            EE_API_TOKEN="test-api-token",
        )
        # The kubelet's $(VAR) expansion.
        env["AUTH_SERVER_URL"] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], env["AUTH_SERVER_URL"])
        env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
        assert c["command"] == ["/bin/sh", "-c"]
        script = c["args"][0].replace("/tmp/", f"{tmp}/")
        result = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
        return result, list(_FakeEmailEngine.received)
    finally:
        server.shutdown()
        server.server_close()


def test_job_script_posts_the_authserver_setting(tmp_path):
    if shutil.which("curl") is None:
        pytest.skip("needs curl (the Job's image has it): apt-get install curl")
    result, received = _run_job_script("s3cret-Value_1.2~3", tmp_path)
    assert result.returncode == 0, result.stderr
    (path, headers, body), = received
    assert path == "/v1/settings"
    assert headers["Authorization"] == "Bearer test-api-token"
    assert body == {"authServer": "http://emailengine:s3cret-Value_1.2~3@127.0.0.1:8080/authentication"}
    assert "s3cret" not in result.stdout + result.stderr, "the password must not be logged"


@pytest.mark.parametrize("password", ["p@ss", "100%", "with space", "trailing-newline\n", ""])
def test_job_script_refuses_passwords_emailengine_would_mangle(password, tmp_path):
    result, received = _run_job_script(password, tmp_path)
    assert result.returncode == 2
    assert not received


def test_example_config_is_consistent():
    spec = pod_spec("example")
    directory, key = flag(container(spec, SIDECAR), "config").rsplit("/", 1)
    config = json.loads(secret_data("example", "ee-auth-sidecar-config")[key])
    assert set(config) == {"auth", "providers", "accounts"}
    for account_id, account in config["accounts"].items():
        if "provider" in account:
            assert account["provider"] in config["providers"], account_id


def test_hot_reloaded_secret_keeps_its_name():
    """A hash-suffixed name would roll the pod on every credential change."""
    spec = pod_spec("example")
    _, volume = mount_for(spec, container(spec, SIDECAR), "/etc/ee-auth-sidecar")
    assert volume["secret"]["secretName"] == "ee-auth-sidecar-config"
    the("example", "Secret", "ee-auth-sidecar-config")


# --- images and Dockerfile --------------------------------------------------------------

@pytest.mark.parametrize("name,cname", ALL_CONTAINERS)
def test_image_is_tagged_not_latest(name, cname):
    image = container(pod_spec(name), cname)["image"]
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    assert tag and tag != "latest", image


def test_example_pins_emailengine_release():
    image = container(pod_spec("example"), EMAILENGINE)["image"]
    assert re.fullmatch(r"postalsys/emailengine:v\d+\.\d+\.\d+", image), image


def test_dockerfile_runtime_stage():
    text = (DEPLOY / "Dockerfile").read_text()
    final = dockerfile_final_stage()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage build"
    assert final[0].startswith("FROM gcr.io/distroless/cc-debian12:nonroot")
    users = [ln.split()[1] for ln in final if ln.startswith("USER ")]
    assert users == ["65532:65532"], "a fixed numeric non-root user"
    assert not re.search(r"^HEALTHCHECK", text, re.M), "Kubernetes probes, no HEALTHCHECK"
    assert dockerfile_entrypoint() == ["/usr/local/bin/ee-auth-sidecar"]


def test_dockerfile_defaults_match_manifests():
    """The image's defaults are the paths the manifests use, and its user is theirs."""
    text = (DEPLOY / "Dockerfile").read_text()
    env = dict(re.findall(r"\b(EE_AUTH_[A-Z_]+)=(\S+)", text))
    sidecar = container(pod_spec("base"), SIDECAR)
    assert env["EE_AUTH_CONFIG"] == flag(sidecar, "config")
    # Not in the environment: `token` would then rotate the live sidecar's refresh tokens.
    assert "EE_AUTH_STATE_DIR" not in env
    cmd = [json.loads(ln.split(" ", 1)[1]) for ln in dockerfile_final_stage() if ln.startswith("CMD ")]
    assert cmd == [["serve", "--state-dir=" + flag(sidecar, "state-dir")]]
    assert sidecar["securityContext"]["runAsUser"] == 65532
    assert sidecar["securityContext"]["runAsGroup"] == 65532


# --- one secret-path convention ---------------------------------------------------------
#
# The config Secret is mounted as one directory (/etc/ee-auth-sidecar), each key a file;
# keys cannot contain `/`. So every secret file a config names must be a direct child of
# that directory, and the shipped configs name it relative to config.json: the key name.
# The same config then works in the pod and beside its placeholder files on a laptop.

EXAMPLES = DEPLOY / "examples"
SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")  # what Kubernetes allows as a Secret key
EXAMPLE_CONFIGS = sorted(EXAMPLES.glob("*.json"))
OVERLAY_CONFIGS = sorted(K8S.glob("overlays/*/secrets/config.json"))


def _sidecar_config_mount(name: str = "example") -> tuple[str, str, str]:
    """(--config path, its directory, the Secret mounted there) of a rendered workload."""
    spec = pod_spec(name)
    sidecar = container(spec, SIDECAR)
    config_path = flag(sidecar, "config")
    directory = config_path.rsplit("/", 1)[0]
    _, volume = mount_for(spec, sidecar, directory)
    return config_path, directory, volume["secret"]["secretName"]


@pytest.mark.parametrize("config", EXAMPLE_CONFIGS + OVERLAY_CONFIGS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_secret_files_are_keys_of_the_mounted_config_secret(config):
    config_path, directory, _ = _sidecar_config_mount()
    refs = secret_refs(json.loads(config.read_text()))
    # The manifests set no environment variable for secrets: {"env": ...} would fail in the pod.
    assert not [r for r in refs if r[1] == "env"], "use {\"file\": \"<key>\"}, not env"
    for path, _, file in (r for r in refs if r[1] == "file"):
        assert not file.startswith("/"), f"{path}: name the key relative to config.json, not {file}"
        resolved = resolve_secret_file(config_path, file)
        parent, key = resolved.rsplit("/", 1)
        assert parent == directory, f"{path}: {file} is not in the mounted Secret {directory}"
        assert SECRET_KEY.match(key), f"{path}: {key} is not a valid Secret key"
        # A placeholder beside the config, so `check` passes on it as shipped.
        assert (config.parent / file).is_file(), f"{path}: no placeholder {config.parent / file}"


def test_overlay_secret_has_every_key_its_config_names():
    config_path, _, secret_name = _sidecar_config_mount()
    data = secret_data("example", secret_name)
    config = json.loads(data[config_path.rsplit("/", 1)[1]])
    keys = {resolve_secret_file(config_path, f).rsplit("/", 1)[1] for _, kind, f in secret_refs(config) if kind == "file"}
    assert keys, "the example names its Basic password by key"
    assert keys <= set(data), f"keys the config names but the Secret lacks: {keys - set(data)}"


DOCS_WITH_SECRET_PATHS = [
    DEPLOY.parent / "README.md",
    DEPLOY.parent / "docs" / "runbook.md",
    DEPLOY.parent / "docs" / "emailengine.md",
    K8S / "README.md",
]


@pytest.mark.parametrize("doc", DOCS_WITH_SECRET_PATHS, ids=lambda p: str(p.relative_to(DEPLOY.parent)))
def test_docs_use_the_same_secret_paths(doc):
    """Secret files in the docs are keys of the mounted Secret: relative names, or absolute
    paths directly in its directory, never below it."""
    _, directory, _ = _sidecar_config_mount()
    text = doc.read_text()
    for m in re.finditer(r'\{\s*"file"\s*:\s*"([^"]+)"\s*\}', text):
        file = m.group(1)
        if file.startswith("<"):
            continue  # a placeholder such as <key>
        resolved = file if file.startswith("/") else f"{directory}/{file}"
        parent, key = resolved.rsplit("/", 1)
        assert parent == directory, f"{doc.name}: {file} is not a key of the Secret mounted at {directory}"
        assert SECRET_KEY.match(key), f"{doc.name}: {key} is not a valid Secret key"
    assert "/etc/ee-auth/" not in text
    assert f"{directory}/config/" not in text and f"{directory}/secrets/" not in text


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(DEPLOY.parent), *args], capture_output=True, text=True)


def test_secrets_of_a_copied_overlay_are_git_ignored():
    if shutil.which("git") is None or _git("rev-parse").returncode != 0:
        pytest.skip("not a git work tree")
    # What deploy/kubernetes/README.md tells the operator to create.
    assert _git("check-ignore", "-q", "deploy/kubernetes/overlays/prod/secrets/config.json").returncode == 0
    assert _git("check-ignore", "-q", "deploy/kubernetes/overlays/prod/secrets/basic-password").returncode == 0
    # The overlay itself stays trackable, and so do the example's placeholders.
    assert _git("check-ignore", "-q", "deploy/kubernetes/overlays/prod/kustomization.yaml").returncode == 1
    assert _git("check-ignore", "-q", "deploy/kubernetes/overlays/example/secrets/config.json").returncode == 1


# --- monitoring -------------------------------------------------------------------------

MONITORING = DEPLOY / "monitoring"
RUNBOOK = DEPLOY.parent / "docs" / "runbook.md"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def _rules() -> list[dict]:
    groups = yaml.safe_load((MONITORING / "rules.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


def test_prometheusrule_carries_the_rules_file():
    plain = yaml.safe_load((MONITORING / "rules.yml").read_text())
    crd = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert crd["apiVersion"] == "monitoring.coreos.com/v1" and crd["kind"] == "PrometheusRule"
    assert crd["spec"]["groups"] == plain["groups"], "regenerate prometheusrule.yaml from rules.yml"


def test_every_alert_has_a_runbook_section_and_a_unit_test():
    anchors = _anchors(RUNBOOK.read_text())
    tests = yaml.safe_load((MONITORING / "rules.test.yml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    for rule in _rules():
        name = rule["alert"]
        url = rule["annotations"]["runbook_url"]
        assert url.split("#", 1)[1] in anchors, f"{name}: {url} has no section in docs/runbook.md"
        assert {"summary", "description"} <= set(rule["annotations"]), name
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert name in tested, f"{name}: no promtool test that sees it fire"


def test_dashboard_is_grafana_json_on_a_prometheus_datasource():
    dash = json.loads((MONITORING / "dashboard.json").read_text())
    assert dash["uid"] and dash["title"]
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
