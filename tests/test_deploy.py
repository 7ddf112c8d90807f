"""The deployment files under deploy/, checked offline (no cluster, no servers, no network).

- Every manifest document validates against the Kubernetes JSON schemas that the
  ``kubernetes-validate`` package bundles (strict: unknown fields are errors).
- The Deployments hang together: selectors, probes on ``/health``, the Prometheus scrape
  annotations on the port that serves ``/metrics``, ConfigMap references, the init
  container that puts spec_plugins on the engine's PYTHONPATH.
- The server flags the manifests pass are exactly the ones the end-to-end tests pass, with
  the same JSON payloads: the reference command is built by the e2e helpers
  (``integration/vllm_server.py``, ``integration/sglang_server.py``) from the
  configurations the e2e tests serve (``SUFFIX_CHAIN_SERVER``, ``CONFIGS["suffix-chain"]``),
  so a drift on either side fails here.
- The Grafana panels query the engines' speculative-decoding metrics.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import kubernetes_validate  # the `test` extra; it bundles the schemas
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"

# A release kubernetes-validate bundles schemas for; the manifests use only long-stable
# APIs (v1, apps/v1), so this mostly pins which schema files are read.
K8S_VERSION = "1.33"
MANIFESTS = {"vllm": DEPLOY / "k8s" / "vllm.yaml", "sglang": DEPLOY / "k8s" / "sglang.yaml"}

# Flags whose value is the machine's, not the configuration's: present on both sides,
# values not compared. The e2e tests serve a locally built checkpoint on a free loopback
# port; the cluster serves a model id on the container port, on every interface so the
# Service reaches it.
MACHINE_VALUES = {"vllm": {"--model", "--port", "--host"},
                  "sglang": {"--model-path", "--port", "--host"}}
# Flags only the e2e test machine needs (a 2-core CPU host without native bf16), dropped
# from the e2e command before comparing; the manifests must not carry them.
TEST_MACHINE_ONLY = {
    "vllm": {
        "--dtype",                  # float32: AVX2 CPUs lack fast bf16; GPUs take the checkpoint's
        "--max-model-len",          # 4096: fits the test host's memory; clusters use the model's
        "--kv-cache-memory-bytes",  # on CPUs the KV cache is host memory, sized by hand
    },
    "sglang": {
        "--max-running-requests",   # 8: small pools for the 2-core test machine
    },
}
# Flags only the deployment needs: SGLang exports /metrics (what Prometheus scrapes) only
# with --enable-metrics; the e2e tests read per-request figures instead. Neither changes
# what is drafted or verified.
DEPLOY_ONLY = {"vllm": set(), "sglang": {"--enable-metrics"}}


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(MANIFESTS[name].read_text()) if d is not None]


def one(name: str, kind: str) -> dict:
    found = [d for d in docs(name) if d["kind"] == kind]
    assert len(found) == 1, f"{MANIFESTS[name].name}: expected one {kind}, found {len(found)}"
    return found[0]


def engine_container(name: str) -> dict:
    (c,) = one(name, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def resolved_env(name: str) -> dict[str, str]:
    """The engine container's environment as the kubelet builds it (ConfigMap keys
    resolved; optional Secret references left out)."""
    config = one(name, "ConfigMap")
    env = {}
    for e in engine_container(name).get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        ref = e["valueFrom"].get("configMapKeyRef")
        if ref is None:
            assert e["valueFrom"]["secretKeyRef"].get("optional"), f"{e['name']}: required secret"
            continue
        assert ref["name"] == config["metadata"]["name"], f"{e['name']}: other ConfigMap"
        assert ref["key"] in config["data"], f"{e['name']}: no key {ref['key']!r} in the ConfigMap"
        env[e["name"]] = config["data"][ref["key"]]
    return env


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command/args ($$ escapes a $)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                  arg)


def manifest_argv(name: str) -> list[str]:
    """The engine's argv after the interpreter, as the pod runs it."""
    c = engine_container(name)
    env = resolved_env(name)
    argv = [expand(a, env) for a in c["command"] + c["args"]]
    unresolved = [a for a in argv if "$(" in a]
    assert not unresolved, f"{name}: references to undefined variables: {unresolved}"
    assert argv[0] == "python3"
    return argv[1:]


def flags(argv: list[str]) -> dict[str, object]:
    """``--flag value`` pairs (a flag without a value maps to None); JSON values parsed."""
    out: dict[str, object] = {}
    i = 0
    while i < len(argv):
        flag = argv[i]
        assert flag.startswith("--"), f"positional argument {flag!r}"
        assert flag not in out, f"{flag} given twice"
        value = None
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
            if value[:1] in "{[":
                value = json.loads(value)
            i += 1
        out[flag] = value
        i += 1
    return out


def compare_flags(engine: str, e2e_argv: list[str], deployed_argv: list[str]) -> None:
    # Same server module (`-m vllm.entrypoints.openai.api_server` / `-m sglang.launch_server`).
    assert deployed_argv[:2] == e2e_argv[:2]
    e2e, deployed = flags(e2e_argv[2:]), flags(deployed_argv[2:])
    test_only, deploy_only = TEST_MACHINE_ONLY[engine], DEPLOY_ONLY[engine]
    # The exemption lists must name flags that exist where they are said to, so they go
    # stale loudly.
    assert test_only <= e2e.keys(), f"not in the e2e command any more: {test_only - e2e.keys()}"
    assert deploy_only <= deployed.keys()
    assert not test_only & deployed.keys(), "a test-machine-only flag in the manifest"
    expected = {k: v for k, v in e2e.items() if k not in test_only}
    got = {k: v for k, v in deployed.items() if k not in deploy_only}
    assert sorted(got) == sorted(expected), "the manifest and the e2e tests pass different flags"
    for flag in expected:
        if flag not in MACHINE_VALUES[engine]:
            assert got[flag] == expected[flag], \
                f"{flag}: manifest {got[flag]!r}, e2e {expected[flag]!r}"


# --- the e2e side -------------------------------------------------------------------

def vllm_e2e_command() -> list[str]:
    """``serve_command`` for the server ``integration/test_vllm_e2e.py`` starts."""
    from integration.test_vllm_e2e import SUFFIX_CHAIN_SERVER
    from integration.vllm_server import serve_command

    return serve_command("MODEL", 0, **SUFFIX_CHAIN_SERVER)


def sglang_e2e_command() -> tuple[list[str], dict[str, str]]:
    """``serve_command`` and the environment for ``integration/test_sglang_methods.py``'s
    ``suffix-chain`` configuration (what it passes to ``sglang_server``)."""
    from integration.sglang_server import serve_command
    from integration.test_sglang_methods import CONFIGS

    extra, options = CONFIGS["suffix-chain"]
    return serve_command("MODEL", 0, extra), {"SPEC_PLUGINS_OPTIONS": json.dumps(options)}


# --- manifests ----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MANIFESTS))
def test_manifests_validate_against_the_kubernetes_schemas(name):
    kinds = []
    for doc in docs(name):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["ConfigMap", "Deployment", "Service"]


def test_the_schema_check_rejects_a_broken_deployment():
    # Not vacuous: a misspelt field and a wrongly typed port are caught.
    good = one("vllm", "Deployment")
    misspelt = copy.deepcopy(good)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    bad_port = copy.deepcopy(good)
    bad_port["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "80a"
    for doc in (misspelt, bad_port):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_deployment_service_probes_and_scrape_annotations(name):
    deployment, service = one(name, "Deployment"), one(name, "Service")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    c = engine_container(name)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports.keys()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    # The annotations point at the port the server listens on.
    server_port = int(flags(manifest_argv(name)[2:])["--port"])
    assert ports["http"] == server_port
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(server_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    for r in ("requests", "limits"):
        assert c["resources"][r].get("memory"), f"no memory {r}"


def package_version() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'(?m)^version\s*=\s*"([^"]+)"', text).group(1)


@pytest.mark.parametrize("name", list(MANIFESTS))
def test_init_container_puts_the_package_on_the_engine_path(name):
    spec = one(name, "Deployment")["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    cmd = init["command"]
    assert cmd[:4] == ["python3", "-m", "pip", "install"]
    # The released version of this tree; no dependencies, so nothing shadows the engine's.
    assert f"spec_plugins=={package_version()}" in cmd and "--no-deps" in cmd
    target = cmd[cmd.index("--target") + 1]
    (init_mount,) = [m for m in init["volumeMounts"] if m["mountPath"] == target]
    engine_mounts = {m["name"]: m["mountPath"] for m in engine_container(name)["volumeMounts"]}
    assert engine_mounts[init_mount["name"]] == resolved_env(name)["PYTHONPATH"] == target
    assert any(v["name"] == init_mount["name"] and "emptyDir" in v for v in spec["volumes"])


@pytest.mark.parametrize("name,group", [("vllm", "vllm.general_plugins"),
                                        ("sglang", "sglang.srt.plugins")])
def test_derived_image_matches_the_manifest(name, group):
    dockerfile = (DEPLOY / f"Dockerfile.{name}").read_text()
    base = re.search(r"(?m)^ARG \w+_IMAGE=(\S+)$", dockerfile).group(1)
    assert base == engine_container(name)["image"]
    requirement = re.search(r"(?m)^ARG SPEC_PLUGINS=(\S+)$", dockerfile).group(1)
    assert requirement == f"spec_plugins=={package_version()}"
    assert group in dockerfile  # the build checks the entry point is visible


# --- the manifests pass exactly the e2e flags -----------------------------------------

def test_vllm_manifest_passes_the_e2e_flags():
    compare_flags("vllm", vllm_e2e_command()[1:], manifest_argv("vllm"))


def test_sglang_manifest_passes_the_e2e_flags_and_options():
    cmd, env = sglang_e2e_command()
    compare_flags("sglang", cmd[1:], manifest_argv("sglang"))
    deployed = resolved_env("sglang")
    for key, value in env.items():
        assert json.loads(deployed[key]) == json.loads(value), key


def test_both_manifests_serve_one_configuration():
    # SGLang's verify width counts the last committed token: vLLM's k + 1.
    v = flags(manifest_argv("vllm")[2:])
    s = flags(manifest_argv("sglang")[2:])
    spec = v["--speculative-config"]
    assert s["--speculative-algorithm"] == spec["model"].replace(".vllm.", ".")
    assert int(s["--speculative-num-draft-tokens"]) == spec["num_speculative_tokens"] + 1
    assert json.loads(resolved_env("sglang")["SPEC_PLUGINS_OPTIONS"]) == \
        v["--additional-config"]["spec_plugins"]


def test_a_drifted_flag_is_caught():
    # The comparison itself, independent of the manifests: the e2e command less its
    # test-machine flags passes; one changed JSON value or one more flag does not.
    e2e = vllm_e2e_command()[1:]
    deployed = e2e[:2]
    for flag, value in flags(e2e[2:]).items():
        if flag not in TEST_MACHINE_ONLY["vllm"]:
            deployed += [flag] + ([] if value is None else
                                  [json.dumps(value) if isinstance(value, dict) else value])
    compare_flags("vllm", e2e, deployed)
    i = deployed.index("--speculative-config") + 1
    spec = json.loads(deployed[i])
    drifted = list(deployed)
    drifted[i] = json.dumps({**spec, "num_speculative_tokens": spec["num_speculative_tokens"] + 1})
    with pytest.raises(AssertionError, match="--speculative-config"):
        compare_flags("vllm", e2e, drifted)
    with pytest.raises(AssertionError, match="different flags"):
        compare_flags("vllm", e2e, deployed + ["--enforce-eager"])


# --- Grafana --------------------------------------------------------------------------

VLLM_COUNTERS = ["vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens",
                 "vllm:spec_decode_num_accepted_tokens_per_pos"]


def grafana_exprs() -> list[str]:
    board = json.loads((DEPLOY / "grafana" / "spec-decode-panel.json").read_text())
    panels = board.get("panels", [board])
    return [t["expr"] for p in panels for t in p["targets"]]


def test_grafana_panels_query_the_spec_decode_metrics():
    exprs = grafana_exprs()
    text = "\n".join(exprs)
    # Prometheus exposes vLLM's counters with the _total suffix.
    for name in VLLM_COUNTERS:
        assert f"{name}_total" in text, name
    assert "sglang:spec_accept_length" in text
    # Mean acceptance length = 1 + rate(accepted) / rate(drafts).
    assert any(re.fullmatch(r"1 \+ .*rate\(vllm:spec_decode_num_accepted_tokens_total\[.*\]\)\)"
                            r" / .*rate\(vllm:spec_decode_num_drafts_total\[.*\]\)\)", e)
               for e in exprs)
    # Draft acceptance rate = rate(accepted) / rate(draft tokens).
    assert any(re.fullmatch(r".*rate\(vllm:spec_decode_num_accepted_tokens_total\[.*\]\)\)"
                            r" / .*rate\(vllm:spec_decode_num_draft_tokens_total\[.*\]\)\)", e)
               for e in exprs)


def test_grafana_metric_names_exist_in_the_installed_vllm():
    spec = importlib.util.find_spec("vllm")  # locates without importing vLLM
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed here")
    source = Path(spec.submodule_search_locations[0]) / "v1" / "spec_decode" / "metrics.py"
    text = source.read_text()
    for name in VLLM_COUNTERS:
        assert f'"{name}"' in text, f"{name} is not a counter of this vLLM"
