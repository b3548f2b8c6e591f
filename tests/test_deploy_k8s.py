"""The Kubernetes recipe and the worker image, checked as far as a machine without a Kubernetes
cluster and without Docker allows.

* The DaskCluster resource that deploy/dask/kubernetes.py submits is validated against the
  schema in the operator's own CustomResourceDefinition, shipped inside dask-kubernetes. The
  API server would silently drop (prune) a field the schema does not declare; here an
  undeclared field is an error, so a misspelt field cannot pass.
* Every container of that resource runs a command the image has, with options that command
  accepts (parsed by the command's own click parser, not run).
* deploy/Dockerfile installs pyproject.toml's pinned set and nothing pinned on its own (fast),
  and the environment it describes builds: its COPY and RUN steps replayed in a fresh virtualenv
  (slow: installs every package; `make test-deploy`).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata, resources

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(ROOT, "deploy", "Dockerfile")
CRD = "operator/deployment/helm/dask-kubernetes-operator/crds/daskcluster.yaml"


def _pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


# --- the DaskCluster resource against the operator's schema ---------------------------------------

def _crd_schema():
    pytest.importorskip("dask_kubernetes", reason="dask-kubernetes not installed: pip install 'emflow[kubernetes]'")
    import yaml

    crd = yaml.safe_load(resources.files("dask_kubernetes").joinpath(CRD).read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == "DaskCluster"
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served") and v.get("storage")]
    return crd["spec"]["group"], version["name"], version["schema"]["openAPIV3Schema"]


def _strict(schema: dict) -> dict:
    """The CRD's structural schema as JSON Schema, with undeclared fields rejected (the API server
    prunes them) unless the schema says x-kubernetes-preserve-unknown-fields."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if node.pop("x-kubernetes-int-or-string", False):
            node.pop("type", None)
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if node.get("nullable"):
            t = node.get("type")
            if t:
                node["type"] = [t, "null"]
        if node.get("type") == "object" and "properties" in node and \
                not node.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for key in ("properties", "patternProperties"):
            for sub in node.get(key, {}).values():
                walk(sub)
        for key in ("items", "additionalProperties", "not"):
            walk(node.get(key))
        for key in ("allOf", "anyOf", "oneOf"):
            for sub in node.get(key, []):
                walk(sub)

    walk(schema)
    # apiVersion, kind and metadata are the API server's, not the CRD's
    schema.setdefault("properties", {}).update(
        apiVersion={"type": "string"}, kind={"type": "string"}, metadata={"type": "object"})
    return schema


def _prune_nulls(value, schema):
    """What the API server does first: drop null values of fields that are not nullable."""
    if isinstance(value, dict):
        props = schema.get("properties", {}) if isinstance(schema, dict) else {}
        extra = schema.get("additionalProperties") if isinstance(schema, dict) else None
        out = {}
        for k, v in value.items():
            sub = props.get(k, extra if isinstance(extra, dict) else {})
            if v is None and not sub.get("nullable"):
                continue
            out[k] = _prune_nulls(v, sub)
        return out
    if isinstance(value, list):
        return [_prune_nulls(v, schema.get("items", {}) if isinstance(schema, dict) else {}) for v in value]
    return value


def _validate(resource: dict):
    import jsonschema

    group, version, schema = _crd_schema()
    assert resource["apiVersion"] == f"{group}/{version}" and resource["kind"] == "DaskCluster"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", resource["metadata"]["name"])
    jsonschema.Draft7Validator(_strict(schema)).validate(_prune_nulls(resource, schema))


@pytest.fixture(scope="module")
def resource():
    pytest.importorskip("dask_kubernetes", reason="dask-kubernetes not installed: pip install 'emflow[kubernetes]'")
    from deploy.dask.kubernetes import cluster_spec

    return cluster_spec(n_workers=5, memory="6Gi", cpu=3, image="registry.example/emflow-worker:1")


def test_dask_cluster_resource_validates_against_operator_schema(resource):
    _validate(resource)
    worker = resource["spec"]["worker"]
    assert worker["replicas"] == 5
    (container,) = worker["spec"]["containers"]
    assert container["image"] == "registry.example/emflow-worker:1"
    assert container["resources"]["limits"] == {"memory": "6Gi", "cpu": "3"}
    assert container["args"][container["args"].index("--nworkers") + 1] == "3"


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["spec"]["worker"].__setitem__("replicas", "five"), "'five' is not of type 'integer'"),
    (lambda r: r["spec"]["worker"].__setitem__("replica", 5), "Additional properties are not allowed ('replica'"),
    (lambda r: r["spec"]["worker"]["spec"]["containers"][0].pop("name"), "'name' is a required property"),
    (lambda r: r["spec"]["scheduler"]["service"].__setitem__("type", 3), "3 is not of type 'string'"),
])
def test_schema_check_rejects_what_the_operator_would_not_take(resource, mutate, message):
    import jsonschema

    bad = copy.deepcopy(resource)
    mutate(bad)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(message)):
        _validate(bad)


def test_every_container_runs_a_command_the_image_has(resource):
    """`dask scheduler` / `dask worker` exist (console script `dask`, subcommands from the
    dask_cli entry points) and accept the recipe's options."""
    import click

    assert shutil.which("dask", path=os.path.dirname(sys.executable)), "the environment has no `dask` command"
    commands = {ep.name: ep for ep in metadata.entry_points(group="dask_cli")}
    containers = [resource["spec"]["scheduler"]["spec"]["containers"][0],
                  resource["spec"]["worker"]["spec"]["containers"][0]]
    for container, sub in zip(containers, ["scheduler", "worker"]):
        args = container.get("command", []) + container["args"]
        assert args[:2] == ["dask", sub], args
        main = commands[sub].load()
        assert isinstance(main, click.Command)
        with main.make_context(f"dask {sub}", list(args[2:]), resilient_parsing=False) as ctx:
            params = ctx.params
        if sub == "worker":
            assert params["nthreads"] == 1 and params["n_workers"] == "3"
            assert params["memory_limit"] == "auto" and params["name"] == "$(DASK_WORKER_NAME)"
        else:
            assert params["host"] == "0.0.0.0"


def test_operator_builds_worker_pods_that_find_the_scheduler(resource):
    """The operator's own builder (dask_kubernetes.operator.controller) turns the resource's
    worker spec into a Deployment: the recipe's environment is kept, the operator adds the worker
    name and scheduler address, and `dask worker` reads that address from its environment."""
    import dask.config

    from dask_kubernetes.operator.controller.controller import build_worker_deployment_spec

    pod_spec = _prune_nulls(resource, _crd_schema()[2])["spec"]["worker"]["spec"]
    deployment = build_worker_deployment_spec("emflow-dask-default", "emflow", "emflow-dask", "abc12",
                                              pod_spec, {}, {})
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["OMP_NUM_THREADS"] == "1" and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["DASK_WORKER_NAME"] == "emflow-dask-default-worker-abc12"
    assert dask.config.collect_env({"DASK_SCHEDULER_ADDRESS": env["DASK_SCHEDULER_ADDRESS"]}) == {
        "scheduler_address": "tcp://emflow-dask-scheduler.emflow.svc.cluster.local:8786"}
    assert container["args"][:2] == ["dask", "worker"] and "$(DASK_WORKER_NAME)" in container["args"]


# --- the worker image -------------------------------------------------------------------------

def _dockerfile_steps():
    """(instruction, argument) pairs of deploy/Dockerfile, continuation lines joined."""
    text = open(DOCKERFILE).read()
    text = re.sub(r"\\\n", " ", text)
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, arg = line.partition(" ")
        steps.append((instr.upper(), arg.strip()))
    return steps


def _pip_requirements(steps) -> list[str]:
    reqs = []
    for instr, arg in steps:
        if instr != "RUN":
            continue
        for part in re.split(r"&&|;", arg):
            words = shlex.split(part)
            if words[:2] == ["pip", "install"] or words[:4] == ["python", "-m", "pip", "install"]:
                reqs += [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
    return reqs


def test_dockerfile_installs_pyprojects_pins_and_no_pins_of_its_own():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    project = _pyproject()
    extras = project["project"]["optional-dependencies"]
    steps = _dockerfile_steps()
    reqs = _pip_requirements(steps)
    assert reqs, "deploy/Dockerfile installs nothing with pip"
    known = {Requirement(r).name: Requirement(r) for r in project["project"]["dependencies"]}
    installs_project = False
    for r in reqs:
        m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", r)
        if m:
            installs_project = True
            for extra in (m.group(1) or "").split(","):
                assert not extra or extra in extras, f"Dockerfile asks for extra {extra!r}, not in pyproject.toml"
            continue
        req = Requirement(r)
        assert req.name in known and req.specifier == known[req.name].specifier, (
            f"deploy/Dockerfile pins {r!r} itself; pin it in pyproject.toml (the image installs '.[kubernetes]')")
    assert installs_project, "deploy/Dockerfile does not install the project (pip install .)"
    assert any(r.startswith(".[") and "kubernetes" in r for r in reqs)

    # what `pip install .` needs is copied in: the packages setuptools finds, the readme
    copied = {os.path.normpath(src) for instr, arg in steps if instr == "COPY" for src in arg.split()[:-1]}
    needed = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed |= {"pyproject.toml", project["project"]["readme"]}
    assert needed <= copied, f"deploy/Dockerfile does not COPY {sorted(needed - copied)}"

    # the base image's Python is one the project supports
    (base,) = [arg for instr, arg in steps if instr == "FROM"]
    py = re.match(r"python:(\d+\.\d+)", base)
    assert py and Version(py.group(1)) in SpecifierSet(project["project"]["requires-python"]), base


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_dockerfile_environment_builds(tmp_path):
    """Replay the Dockerfile's COPY and RUN steps in a fresh virtualenv (the image's WORKDIR a temp
    folder, its python the venv's): the install and `pip check` pass, and the result has emflow at
    pyproject's version, every pinned dependency at its pin, and the commands the image runs."""
    from packaging.requirements import Requirement

    steps = _dockerfile_steps()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bindir = str(venv / "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=bindir + os.pathsep + env.get("PATH", ""), VIRTUAL_ENV=str(venv))
    workdir = tmp_path / "image"
    workdir.mkdir()
    for instr, arg in steps:
        if instr == "ENV":
            for word in shlex.split(arg):
                k, _, v = word.partition("=")
                env[k] = v
        elif instr == "WORKDIR":
            env["EMFLOW_IMAGE_WORKDIR"] = arg  # the real path inside the image; here: workdir
        elif instr == "COPY":
            *srcs, dst = arg.split()
            target = workdir / dst if dst not in ("./", ".") else workdir
            for src in srcs:
                s = os.path.join(ROOT, src)
                if os.path.isdir(s):
                    shutil.copytree(s, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(s, target / os.path.basename(src))
        elif instr == "RUN":
            proc = subprocess.run(["bash", "-c", arg], cwd=workdir, env=env, capture_output=True, text=True)
            assert proc.returncode == 0, f"RUN {arg} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    py = str(venv / "bin" / "python")

    def installed(name):
        out = subprocess.run([py, "-c", f"import importlib.metadata as m; print(m.version({name!r}))"],
                             cwd=tmp_path, env=env, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    project = _pyproject()["project"]
    assert installed("emflow") == project["version"]
    for r in project["dependencies"] + project["optional-dependencies"]["kubernetes"]:
        req = Requirement(r)
        version = installed(req.name)
        assert version is not None, f"{req.name} missing from the image environment"
        assert req.specifier.contains(version, prereleases=True), f"{req.name} {version} does not satisfy {r}"
    check = subprocess.run(
        [py, "-c", "import emflow, flows.fit, dask_kubernetes.operator, prefect_kubernetes, s3fs, gcsfs; "
                   "print(emflow.__version__)"], cwd=workdir, env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr[-3000:]
    for cmd in (["dask", "worker", "--help"], ["dask", "scheduler", "--help"], ["prefect", "worker", "start", "--help"]):
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "Usage" in proc.stdout, (cmd, proc.stderr[-2000:])
