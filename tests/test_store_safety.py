"""Models and outputs are never lost, replaced unasked, half-read, or able to redirect computation.

1. nothing replaced unasked (library and CLI): overwrite=True / --overwrite for an emflow model
   or output of the same kind; never a dataset, other files, a file, the input or the model;
2. crash-safe replacement: SIGKILL at every filesystem step of a save leaves a loadable model
   (old or new, bit-identical), the next save cleans every leftover, never a live writer's;
   readers loading during saves always get one whole version;
3. load validates every array (shapes, finiteness, simplexes, definiteness, digests, chunks)
   and the attributes, raising ModelFormatError naming what is wrong;
4. no stored scheduler: a file naming an address loads with scheduler None and scoring it
   never connects there.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zarr
from typer.testing import CliRunner

import emflow
import emflow.storage.store as S
from emflow.cli.main import app
from emflow.errors import ConfigError, ModelFormatError

RNG = np.random.default_rng(3)
X = np.vstack([RNG.normal(-3, 1, size=(150, 2)), RNG.normal(3, 1, size=(150, 2))])


@pytest.fixture(scope="module")
def models():
    a = emflow.GaussianMixture(2, random_state=0, scheduler="threads").fit(X)
    b = emflow.GaussianMixture(2, covariance_type="diag", random_state=1, scheduler="threads").fit(X[::-1] * 2)
    return a, b


def _arrays_of(m):
    return (m.weights_, m.means_, m.covariances_, m.precisions_cholesky_)


def _same(m, ref) -> bool:
    pairs = zip(_arrays_of(m), _arrays_of(ref))
    return type(m) is type(ref) and m.covariance_type == ref.covariance_type and all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y) for x, y in pairs)


def _rows(path, data=X):
    arr = zarr.create_array(str(path), shape=data.shape, chunks=(100, data.shape[1]), dtype="float64")
    arr[...] = data
    return str(path)


def _tree(path):
    out = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, path)] = fh.read()
    return out


# -- 1. nothing replaced unasked ---------------------------------------------------------------
def test_save_replaces_a_model_only_with_overwrite(models, tmp_path):
    a, b = models
    path = a.save(tmp_path / "m.zarr")
    with pytest.raises(ConfigError, match=r"already holds an emflow gaussian_mixture model\. Pass overwrite=True"):
        b.save(path)
    assert _same(emflow.load(path), a)
    b.save(path, overwrite=True)
    assert _same(emflow.load(path), b)
    assert os.listdir(tmp_path) == ["m.zarr"]


def test_save_never_replaces_what_is_not_a_model(models, tmp_path):
    a, _ = models
    data = _rows(tmp_path / "data.zarr")
    other = tmp_path / "docs"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    afile = tmp_path / "file.zarr"
    afile.write_text("a file")
    output = tmp_path / "labels.zarr"
    a.predict(data, out=output)
    for target, what in [(data, "Zarr store that emflow did not write"), (other, "other files"),
                         (afile, "a file"), (output, "an emflow output")]:
        before = _tree(target) if os.path.isdir(target) else open(target, "rb").read()
        for overwrite in (False, True):
            with pytest.raises(ConfigError, match=rf"{what}.*never replaces, even with overwrite\. Choose another"):
                a.save(target, overwrite=overwrite)
        assert (_tree(target) if os.path.isdir(target) else open(target, "rb").read()) == before


def test_save_never_onto_the_data_it_was_fitted_on(tmp_path):
    group = tmp_path / "data.zarr"
    g = zarr.open_group(str(group), mode="w")
    g.create_array("X", data=X, chunks=(100, 2))
    g.attrs["rows"] = "X"
    gm = emflow.GaussianMixture(2, random_state=0, max_iter=3, scheduler="threads").fit(str(group))
    before = _tree(group)
    for target in (group, group / "X", group / "X" / "sub.zarr"):
        with pytest.raises(ConfigError, match=r"the data the model was fitted on.*Choose another path"):
            gm.save(target, overwrite=True)
    assert _tree(group) == before


def test_empty_directory_is_a_fine_destination(models, tmp_path):
    a, _ = models
    (tmp_path / "m.zarr").mkdir()
    a.save(tmp_path / "m.zarr")
    assert _same(emflow.load(tmp_path / "m.zarr"), a)


def test_outputs_replace_only_outputs_and_never_inputs(models, tmp_path):
    a, _ = models
    data = _rows(tmp_path / "data.zarr")
    mpath = a.save(tmp_path / "m.zarr")
    model = emflow.load(mpath)
    out = tmp_path / "labels.zarr"
    model.predict(data, out=out)
    with pytest.raises(ConfigError, match=r"already holds an emflow output.*overwrite=True"):
        model.predict_proba(data, out=out)
    model.predict_proba(data, out=out, overwrite=True)
    assert zarr.open_array(str(out)).shape == (300, 2)
    model_tree, data_tree = _tree(mpath), _tree(data)
    for target, what in [(data, "the input data"), (mpath, "the model being applied"),
                         (os.path.join(mpath, "sub"), "the model being applied"), (tmp_path, "the input data")]:
        with pytest.raises(ConfigError, match=rf"{what}.*Choose another path"):
            model.predict(data, out=target, overwrite=True)
    assert _tree(mpath) == model_tree and _tree(data) == data_tree
    # the shared writer used by `emflow predict` and the scoring flow has the same rule
    from emflow.estimators.outputs import write_output

    with pytest.raises(ConfigError, match="overwrite=True"):
        write_output(model, "labels", data, out)
    write_output(model, "labels", data, out, overwrite=True)
    assert zarr.open_array(str(out)).dtype == np.int64


def _cli(*args):
    """Exit code and output, with Rich's line wrapping undone."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    return r.exit_code, " ".join(r.output.split())


def _one_error(output: str) -> bool:
    return output.count("error:") == 1 and "Traceback" not in output


def test_cli_fit_and_predict_ask_before_replacing(models, tmp_path):
    data = _rows(tmp_path / "data.zarr")
    data_tree = _tree(data)
    model = tmp_path / "m.zarr"
    code, out = _cli("fit", data, "-k", "2", "-o", data, "-s", "threads", "--overwrite")
    assert code == 2 and "DATA" in out and "Choose another path" in out and _one_error(out), out
    assert _tree(data) == data_tree
    code, out = _cli("fit", data, "-k", "2", "-o", model, "-s", "threads", "--seed", "0", "--max-iter", "3")
    assert code == 0, out
    first = _tree(model)
    code, out = _cli("fit", data, "-k", "2", "-o", model, "-s", "threads", "--max-iter", "3")
    assert code == 2 and "--overwrite" in out and _one_error(out), out
    assert _tree(model) == first
    code, out = _cli("fit", data, "-k", "2", "-o", model, "-s", "threads", "--max-iter", "3", "--overwrite")
    assert code == 0, out
    model_tree = _tree(model)
    other = tmp_path / "dir"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    for target, what in [(data, "DATA"), (model, "MODEL"), (other, "other files")]:
        for extra in ([], ["--overwrite"]):
            code, out = _cli("predict", model, data, "-o", target, "-s", "threads", *extra)
            assert code == 2 and what in out and "Choose another path" in out and _one_error(out), out
    assert _tree(data) == data_tree and _tree(model) == model_tree and (other / "keep.txt").read_text() == "x"
    labels = tmp_path / "labels.zarr"
    assert _cli("predict", model, data, "-o", labels, "-s", "threads")[0] == 0
    code, out = _cli("predict", model, data, "-o", labels, "-s", "threads", "--what", "proba")
    assert code == 2 and "--overwrite" in out, out
    code, out = _cli("predict", model, data, "-o", labels, "-s", "threads", "--what", "proba", "--overwrite")
    assert code == 0 and zarr.open_array(str(labels)).shape == (300, 2), out


# -- 2. crash safety ---------------------------------------------------------------------------
_STEPS = ("replace", "rename", "link", "unlink", "remove", "mkdir", "rmdir", "fsync")


def _die_at(n: int) -> None:
    """In a child: SIGKILL this process at the n-th filesystem mutation (counting every write
    open, rename, link, unlink, mkdir, rmdir, fsync and rmtree)."""
    count = {"n": 0}

    def tick():
        count["n"] += 1
        if count["n"] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(fn):
        def inner(*a, **k):
            tick()
            return fn(*a, **k)
        return inner

    for name in _STEPS:
        setattr(os, name, wrap(getattr(os, name)))
    shutil.rmtree = wrap(shutil.rmtree)
    real_open = io.open

    def opener(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            tick()
        return real_open(file, mode, *a, **k)

    io.open = builtins.open = opener


def _save_in_child(model, path, n: int, overwrite: bool) -> int:
    """Fork; the child saves with a SIGKILL at step n. Returns the child's wait status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            _die_at(n)
            model.save(path, overwrite=overwrite)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the save child killed at step {n} hung")
        time.sleep(0.005)


def _leftovers(parent, path) -> list[str]:
    bad = [n for n in os.listdir(parent) if n != os.path.basename(path)]
    if os.path.isdir(path):
        inside = os.listdir(path)
        current = S.read_model_attrs(path)["current"]
        bad += [n for n in inside if n not in ("zarr.json", current) and not n.startswith("v-")]
        bad += [n for n in inside if n.startswith("v-")][2:]  # the current and the previous version
    return bad


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("existing", [True, False], ids=["replace", "new-path"])
def test_sigkill_at_every_step_of_a_save(models, tmp_path, existing):
    a, b = models
    path = str(tmp_path / "m.zarr")
    steps = 0
    for n in range(1, 200):
        if existing and not os.path.exists(path):
            a.save(path)
        status = _save_in_child(b, path, n, overwrite=True)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        if os.path.exists(path):
            back = emflow.load(path)  # old or new, whole, bit-identical
            assert _same(back, a) or _same(back, b), n
        else:
            assert not existing and killed, n  # a first save killed early leaves nothing at all
        if not killed:
            assert _same(emflow.load(path), b)
            steps = n
            break
        # the next write cleans every leftover of the killed one
        a.save(path, overwrite=os.path.exists(path))
        assert _same(emflow.load(path), a)
        assert _leftovers(tmp_path, path) == [], (n, os.listdir(tmp_path), os.listdir(path))
        if not existing:
            shutil.rmtree(path)
    assert steps > 5  # it ran to completion after killing it at every step before


def test_live_writers_temporaries_are_kept_dead_ones_removed(models, tmp_path):
    a, _ = models
    path = a.save(tmp_path / "m.zarr")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = S._tag().replace(f"_{os.getpid()}_", f"_{sleeper.pid}_")
        dead_proc = subprocess.Popen([sys.executable, "-c", "pass"])
        dead_proc.wait()
        dead = S._tag().replace(f"_{os.getpid()}_", f"_{dead_proc.pid}_")
        for tag in (live, dead):
            os.mkdir(tmp_path / f".m.zarr.tmp-{tag}")
            os.mkdir(os.path.join(path, f"v-{tag}"))
            (tmp_path / f".m.zarr.checkpoint.npz.tmp-{tag}").write_bytes(b"partial")
        a.save(path, overwrite=True)
        names = set(os.listdir(tmp_path)) | set(os.listdir(path))
        assert {f".m.zarr.tmp-{live}", f"v-{live}", f".m.zarr.checkpoint.npz.tmp-{live}"} <= names
        assert not any(dead in n for n in names)
    finally:
        sleeper.kill()
        sleeper.wait()
    a.save(path, overwrite=True)
    assert not any(live in n for n in set(os.listdir(tmp_path)) | set(os.listdir(path)))


def test_checkpoint_writer_cleans_dead_temporaries(tmp_path):
    from emflow.storage.checkpoint import Checkpoint, write_checkpoint
    from emflow.models.gmm import GMMParams

    ck = tmp_path / "m.zarr.checkpoint.npz"
    dead_proc = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_proc.wait()
    stale = tmp_path / f".m.zarr.checkpoint.npz.tmp-{S._tag().replace(f'_{os.getpid()}_', f'_{dead_proc.pid}_')}"
    stale.write_bytes(b"half")
    legacy = tmp_path / ".m.zarr.checkpoint.npz.tmp-0123456789ab"  # an older emflow's name, an hour old
    legacy.write_bytes(b"half")
    os.utime(legacy, (1, 1))
    p = GMMParams(np.array([1.0]), np.zeros((1, 1)), np.ones((1, 1, 1)), np.ones((1, 1, 1)), "full")
    write_checkpoint(ck, Checkpoint(p, [0.0], [0.1], False, "fp", "ch"))
    assert sorted(os.listdir(tmp_path)) == ["m.zarr.checkpoint.npz"]


def test_a_replacement_killed_between_its_renames_is_put_back(tmp_path):
    """atomic_dir (outputs, datasets) moves the old directory aside, then the new one in: a
    crash between the two leaves .NAME.old-*, which the next write of NAME puts back (before
    deciding whether it may replace what is there)."""
    out = tmp_path / "labels.zarr"
    arr = zarr.create_array(str(out), shape=(3,), dtype="int64")
    arr[...] = [1, 2, 3]
    arr.attrs["emflow"] = {"kind": "labels", "model_family": "gaussian_mixture"}
    dead_proc = subprocess.Popen([sys.executable, "-c", "pass"])
    dead_proc.wait()
    tag = S._tag().replace(f"_{os.getpid()}_", f"_{dead_proc.pid}_")
    os.replace(out, tmp_path / f".labels.zarr.old-{tag}")
    os.mkdir(tmp_path / f".labels.zarr.tmp-{tag}")
    model = emflow.GaussianMixture(1, max_iter=1, scheduler="threads").fit(X)
    with pytest.raises(ConfigError, match="overwrite=True"):  # the put-back output is not replaced unasked
        model.predict(X, out=out)
    assert os.listdir(tmp_path) == ["labels.zarr"]
    assert zarr.open_array(str(out))[...].tolist() == [1, 2, 3]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Zarr notes a version vanishing under a reader
def test_readers_during_saves_always_get_a_whole_model(models, tmp_path):
    a, b = models
    path = a.save(tmp_path / "m.zarr")
    stop = threading.Event()
    seen, errors = {"a": 0, "b": 0}, []

    def reader():
        while not stop.is_set():
            try:
                m = emflow.load(path)
            except Exception as exc:  # noqa: BLE001 - every failure is recorded
                errors.append(repr(exc))
                continue
            if _same(m, a):
                seen["a"] += 1
            elif _same(m, b):
                seen["b"] += 1
            else:
                errors.append("a mixture of versions")

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(40):
            (b if i % 2 == 0 else a).save(path, overwrite=True)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert seen["a"] + seen["b"] > 0


# -- 3. load validates ---------------------------------------------------------------------------
def _version_dir(path):
    return os.path.join(path, S.read_model_attrs(path)["current"])


def _edit_attrs(path, fn):
    ptr = os.path.join(path, "zarr.json")
    doc = json.load(open(ptr))
    fn(doc["attributes"]["emflow"])
    with open(ptr, "w") as f:
        json.dump(doc, f)


@pytest.mark.parametrize("name,alter,why", [
    ("weights", lambda m: m.weights_.__setitem__(0, -0.2), "negative"),
    ("weights", lambda m: m.weights_.__setitem__(0, np.nan), "NaN"),
    ("weights", lambda m: m.weights_.__setitem__(0, m.weights_[0] + 1e-6), "sum to 1"),
    ("precisions_cholesky", lambda m: m.precisions_cholesky_.__setitem__((0, 0, 0), np.nan), "NaN"),
    ("precisions_cholesky", lambda m: m.precisions_cholesky_.__setitem__((0, 0, 0), -1.0), "diagonal"),
    ("covariances", lambda m: m.covariances_.__setitem__((1, 0, 1), 5.0), "symmetric"),
    ("covariances", lambda m: m.covariances_.__setitem__(1, -np.eye(2)), "positive definite"),
])
def test_load_rejects_arrays_that_break_the_family_constraints(models, tmp_path, name, alter, why):
    import copy

    m = copy.deepcopy(models[0])
    alter(m)
    path = m.save(tmp_path / "m.zarr")  # save writes what it is given, with matching digests
    with pytest.raises(ModelFormatError, match=rf"array '{name}' .*{why}"):
        emflow.load(path)


def test_load_detects_altered_and_deleted_chunks(models, tmp_path):
    a, _ = models
    path = a.save(tmp_path / "m.zarr")
    v = _version_dir(path)
    arr = zarr.open_array(os.path.join(v, "means"), mode="r+")
    arr[0, 0] = arr[0, 0] + 1.0  # a plausible value: only the digest can tell
    with pytest.raises(ModelFormatError, match=r"array 'means'.*digest"):
        emflow.load(path)
    a.save(path, overwrite=True)
    shutil.rmtree(os.path.join(_version_dir(path), "weights", "c"))  # Zarr would read the fill value
    with pytest.raises(ModelFormatError, match=r"array 'weights'.*1 of its 1 chunk\(s\) are missing"):
        emflow.load(path)


@pytest.mark.filterwarnings("ignore::emflow.EmflowConvergenceWarning")
def test_arrays_equal_to_the_fill_value_round_trip(tmp_path):
    """Zarr skips chunks equal to the fill value unless told otherwise: an all-zero array
    (a state-space model's initial mean) must still load, and its chunk's deletion be seen."""
    ssm = emflow.LinearGaussianSSM(state_dim=1, max_iter=2, scheduler="threads", em_vars=["R"],
                                   initial_state_mean=[0.0]).fit(X[:60, :1])
    path = ssm.save(tmp_path / "ssm.zarr")
    back = emflow.load(path)
    assert np.array_equal(back.initial_state_mean_, np.zeros(1))
    os.remove(os.path.join(_version_dir(path), "initial_state_mean", "c", "0"))
    with pytest.raises(ModelFormatError, match=r"array 'initial_state_mean'.*chunk"):
        emflow.load(path)


def _as_format_1(model, path, extra_config=None):
    """Write ``model`` the way emflow's format 1 did (arrays at the root, no digests)."""
    tmp = str(path) + ".new"
    model.save(tmp)
    meta = S.read_model_attrs(tmp)
    src = zarr.open_group(_version_dir(tmp), mode="r")
    g = zarr.open_group(str(path), mode="w")
    for name, arr in src.arrays():
        g.create_array(name, data=arr[...], chunks=arr.shape, compressors=None)
    meta = {k: v for k, v in meta.items() if k not in ("current", "arrays")}
    meta["format"] = 1
    meta["config"].update(extra_config or {})
    g.attrs["emflow"] = meta
    shutil.rmtree(tmp)
    return str(path)


def test_format_1_models_still_load_and_are_checked(models, tmp_path):
    a, b = models
    path = _as_format_1(a, tmp_path / "old.zarr")
    assert _same(emflow.load(path), a)
    os.remove(os.path.join(path, "weights", "c", "0"))  # reads as zeros: not a distribution
    with pytest.raises(ModelFormatError, match=r"array 'weights' .*sum to 1"):
        emflow.load(path)
    # replacing a format-1 model upgrades it in place; its root arrays go
    path = _as_format_1(a, tmp_path / "old2.zarr")
    b.save(path, overwrite=True)
    assert _same(emflow.load(path), b)
    assert S.read_model_attrs(path)["format"] == S.FORMAT_VERSION == 2
    assert sorted(n for n in os.listdir(path) if not n.startswith("v-")) == ["zarr.json"]


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.pop("config"), "no 'config' attribute"),
    (lambda m: m.pop("fitted"), "no 'fitted' attribute"),
    (lambda m: m.__setitem__("format", "2"), "format '2', not an integer"),
    (lambda m: m.__setitem__("format", 2.0), "not an integer"),
    (lambda m: m.__setitem__("family", "gaussian_hmm"), "is a .gaussian_hmm. model but its arrays do not match"),
    (lambda m: m.__setitem__("family", "latent_dirichlet_allocation"), "arrays do not match that family"),
    (lambda m: m["config"].__setitem__("n_components", 3), r"array 'weights' has shape \(2,\)"),
    (lambda m: m["config"].__setitem__("covariance_type", "bogus"), "configuration its family .* cannot use"),
    (lambda m: m["fitted"].pop("n_features_in"), "configuration its family .* cannot use"),
    (lambda m: m.__setitem__("current", "../elsewhere"), "no valid current version"),
])
def test_damaged_attributes_raise_model_format_error(models, tmp_path, edit, match):
    a, _ = models
    path = a.save(tmp_path / "m.zarr")
    _edit_attrs(path, edit)
    with pytest.raises(ModelFormatError, match=match):
        emflow.load(path)


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.pop("config"), "no 'config' attribute"),
    (lambda m: m.__setitem__("format", "x"), "format 'x', not an integer"),
    (lambda m: m["fitted"].pop("n_features_in"), "configuration its family"),
])
def test_cli_info_and_predict_report_a_damaged_model_in_one_error(models, tmp_path, edit, match):
    a, _ = models
    data = _rows(tmp_path / "data.zarr")
    path = a.save(tmp_path / "m.zarr")
    _edit_attrs(path, edit)
    for args in (["info", path], ["predict", path, data, "-o", tmp_path / "out.zarr", "-s", "threads"]):
        code, out = _cli(*args)
        assert code == 2 and match in out and _one_error(out), out
    assert not os.path.exists(tmp_path / "out.zarr")


def test_every_family_declares_its_arrays_to_the_one_validator():
    """The table each family gives store.validate_arrays: a valid set passes, a broken one names the array."""
    K, d, k = 2, 3, 2
    eye = np.eye(d)
    cases = [
        (emflow.GaussianHMM, {"config": {"n_components": K, "covariance_type": "diag"}, "fitted": {"n_features": d}},
         {"startprob": np.array([.5, .5]), "transmat": np.full((K, K), .5), "means": np.zeros((K, d)),
          "covars": np.ones((K, d))}, ("transmat", np.array([[.5, .5], [.9, .2]]), "sum to 1")),
        (emflow.CategoricalHMM, {"config": {"n_components": K}, "fitted": {"n_features": 4}},
         {"startprob": np.array([1., 0.]), "transmat": np.eye(K), "emissionprob": np.full((K, 4), .25)},
         ("emissionprob", np.full((K, 4), -.25), "negative")),
        (emflow.LatentDirichletAllocation, {"config": {"n_components": K}, "fitted": {"n_features_in": 5}},
         {"components": np.ones((K, 5))}, ("components", np.zeros((K, 5)), "not > 0")),
        (emflow.LinearGaussianSSM, {"config": {"state_dim": k}, "fitted": {"n_features_in": d}},
         {"transition_matrix": np.eye(k), "observation_matrix": np.ones((d, k)), "transition_covariance": np.eye(k),
          "observation_covariance": eye, "initial_state_mean": np.zeros(k), "initial_state_covariance": np.eye(k)},
         ("observation_covariance", -eye, "positive semi-definite")),
    ]
    for cls, meta, arrays, (name, bad, why) in cases:
        meta = {**meta, "family": cls.__name__}
        S.validate_arrays("p", arrays, meta, cls._array_spec)
        with pytest.raises(ModelFormatError, match=rf"array '{name}' .*{why}"):
            S.validate_arrays("p", {**arrays, name: bad}, meta, cls._array_spec)
        with pytest.raises(ModelFormatError, match=rf"missing {name}"):
            S.validate_arrays("p", {n: v for n, v in arrays.items() if n != name}, meta, cls._array_spec)


# -- 4. no stored scheduler ----------------------------------------------------------------------
def test_a_saved_model_never_names_a_scheduler(models, tmp_path):
    a, _ = models
    a.scheduler = "tcp://10.0.0.1:8786"
    try:
        path = a.save(tmp_path / "m.zarr")
    finally:
        a.scheduler = "threads"
    assert "scheduler" not in S.read_model_attrs(path)["config"]
    assert b"tcp://" not in b"".join(_tree(path).values())
    assert emflow.load(path).scheduler is None


def test_a_file_naming_a_scheduler_never_makes_load_or_score_connect(models, tmp_path):
    a, _ = models
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    try:
        path = _as_format_1(a, tmp_path / "evil.zarr", {"scheduler": f"tcp://127.0.0.1:{port}"})
        assert S.read_model_attrs(path)["config"]["scheduler"] == f"tcp://127.0.0.1:{port}"
        m = emflow.load(path)
        assert m.scheduler is None and "scheduler" not in m._config()
        assert np.isfinite(m.score(X)) and m.predict(_rows(tmp_path / "d.zarr")).shape == (300,)
        with pytest.raises(socket.timeout):
            listener.accept()  # nobody ever connected
    finally:
        listener.close()


def test_dataset_writers_replace_only_emflow_datasets_and_only_when_asked(tmp_path):
    """`emflow generate`, the synthetic writers, write_sequences/write_corpus and ingest never
    replace anything unasked: an emflow dataset only with overwrite, anything else never."""
    import scipy.sparse as sp
    from typer.testing import CliRunner

    from emflow.cli.main import app
    from emflow.storage.corpus import write_corpus
    from emflow.storage.sequences import write_sequences
    from emflow.storage.synthetic import write_gmm, write_hmm, write_lda, write_lgssm

    writers = {
        "gmm": lambda p, **kw: write_gmm(p, 100, 2, 2, **kw),
        "hmm": lambda p, **kw: write_hmm(p, 5, 2, 1, **kw),
        "lgssm": lambda p, **kw: write_lgssm(p, 3, 1, 1, **kw),
        "lda": lambda p, **kw: write_lda(p, 20, 10, 2, **kw),
        "sequences": lambda p, **kw: write_sequences(p, np.zeros((6, 1)), [0, 3, 6], **kw),
        "corpus": lambda p, **kw: write_corpus(p, sp.csr_matrix(np.ones((3, 4))), **kw),
    }
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    model = tmp_path / "model.zarr"
    emflow.GaussianMixture(1, scheduler="threads").fit(np.random.default_rng(0).normal(size=(50, 2))).save(model)
    for name, write in writers.items():
        path = tmp_path / f"{name}.zarr"
        write(path)
        before = sorted(os.listdir(path))
        with pytest.raises(emflow.ConfigError, match="already holds an emflow .* dataset. Pass overwrite=True"):
            write(path)
        assert sorted(os.listdir(path)) == before
        write(path, overwrite=True)
        for target in (other, model):
            with pytest.raises(emflow.ConfigError, match="never replaces, even with overwrite"):
                write(target, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me"
    emflow.load(model)

    runner = CliRunner()
    data = str(tmp_path / "gen.zarr")
    assert runner.invoke(app, ["generate", data, "-n", "100"]).exit_code == 0
    r = runner.invoke(app, ["generate", data, "-n", "100"])
    assert r.exit_code == 2 and "--overwrite" in r.output
    assert runner.invoke(app, ["generate", data, "-n", "100", "--overwrite"]).exit_code == 0
    r = runner.invoke(app, ["generate", str(other), "-n", "100", "--overwrite"])
    assert r.exit_code == 2 and "never replaces" in r.output
    assert (other / "notes.txt").read_text() == "keep me"
