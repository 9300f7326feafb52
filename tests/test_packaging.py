"""Packaging for reuse: the core install (jax, jaxlib, flax, optax, numpy only), the `full` extra,
and named experiments shipped in the wheel as `cnn_jax.experiments`.

The wheel is built from a copy of the sources (so the build never writes into the checkout) and
installed with `--no-deps --no-index` into fresh venvs that see exactly the distributions of a
requirement closure computed here with `importlib.metadata`: a folder of symlinks to their files
in this venv, added to the new venv's path by a `.pth` file. Nothing is downloaded. The venvs are
made once per test session.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path, PurePath

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from cnn_jax import cli

REPO = Path(__file__).resolve().parent.parent
CORE = ("jax", "jaxlib", "flax", "optax", "numpy")
# Import names of the `full` extra's distributions (cli.main names them when one is missing).
FULL_MODULES = (
    "tensorflow", "tensorflow_datasets", "orbax", "matplotlib", "ml_collections", "tqdm",
    "tensorboardX", "PIL", "sklearn",
)  # fmt: skip
EXTRA_MESSAGE = re.compile(
    r"^cnn-jax: error: this command needs (\w+) from the 'full' extra: "
    r"pip install 'cnn_jax\[full\]'$"
)


# ----------------------------------------------------------------------------------------------
# Requirement closures and venvs that see only them
# ----------------------------------------------------------------------------------------------


def installed_distributions() -> dict[str, metadata.Distribution]:
    """This venv's distributions by canonical name (the first on sys.path wins)."""
    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonicalize_name(name), dist)
    return found


def requirement_closure(roots: tuple[str, ...]) -> dict[str, metadata.Distribution]:
    """The installed distributions `roots` need, transitively: requirements whose markers hold
    here, with the extras that were asked for (e.g. etils[epath]), none of the optional ones."""
    installed = installed_distributions()
    extras_of: dict[str, set[str]] = {}
    todo = [(canonicalize_name(r), frozenset()) for r in roots]
    while todo:
        name, extras = todo.pop()
        if name not in installed:
            continue  # e.g. a requirement for another platform
        if name in extras_of and extras <= extras_of[name]:
            continue
        extras_of.setdefault(name, set()).update(extras)
        for text in installed[name].requires or []:
            req = Requirement(text)
            envs = [{"extra": e} for e in ("", *sorted(extras_of[name]))]
            if req.marker is None or any(req.marker.evaluate(env) for env in envs):
                todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return {name: installed[name] for name in sorted(extras_of)}


def expose(dists: dict[str, metadata.Distribution], dest: Path) -> Path:
    """Makes `dest` a folder of symlinks to the files (packages, modules, .dist-info folders) of
    `dists` and of nothing else: a folder owned by these distributions only is linked whole, one
    shared with others (a namespace package) is made here and its entries linked one by one."""
    others = {n: d for n, d in installed_distributions().items() if n not in dists}
    shared: set[tuple[str, ...]] = set()
    for dist in others.values():
        for f in dist.files or []:
            parts = PurePath(f).parts
            if parts and parts[0] != "..":
                shared.update(parts[:i] for i in range(1, len(parts) + 1))
    dest.mkdir(parents=True)
    for dist in dists.values():
        root = Path(dist.locate_file(""))
        for f in dist.files or []:
            parts = PurePath(f).parts
            if not parts or parts[0] == ".." or "__pycache__" in parts:
                continue
            prefix = next((parts[:i] for i in range(1, len(parts) + 1) if parts[:i] not in shared),
                          parts)  # fmt: skip
            link, source = dest.joinpath(*prefix), root.joinpath(*prefix)
            if link.is_symlink() or link.exists() or not source.exists():
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(source)
    return dest


def make_venv(path: Path, deps: Path) -> Path:
    """A venv without pip whose only third-party packages are those linked in `deps`."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-I", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    (Path(purelib) / "_cnn_jax_test_deps.pth").write_text(f"{deps}\n")
    return python


def pip_install(python: Path, wheel: Path) -> None:
    """Installs a built wheel into the venv of `python` with this venv's pip, offline."""
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", "--no-index", "--disable-pip-version-check", str(wheel)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip


def isolated_env(cwd: Path) -> dict[str, str]:
    """This environment without Python or venv settings, user site-packages off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PYTHONNOUSERSITE="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PWD=str(cwd))
    return env


def run_command(args: list, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args],
        check=False, cwd=cwd, env=isolated_env(cwd), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def run_in(python: Path, code: str, cwd: Path) -> dict:
    """Runs `code` in an isolated interpreter of that venv; its last stdout line is JSON."""
    done = run_command([python, "-I", "-c", textwrap.dedent(code)], cwd)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Session fixtures: the wheel, the editable wheel and three venvs, made once
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def packaging_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("packaging")


@pytest.fixture(scope="session")
def source_copy(packaging_root) -> Path:
    """The files a build reads (pyproject.toml, README.md, cnn_jax/, experiments/), copied: the
    tracked and untracked files git does not ignore, so package data (the explorer's page) is
    in the wheel exactly when a clone would have it."""
    src = packaging_root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "cnn_jax", "experiments"],
        cwd=REPO, check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    for path in (REPO / name for name in listed):
        if path.is_file():
            target = src / path.relative_to(REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    return src


@pytest.fixture(scope="session")
def wheel(packaging_root, source_copy) -> Path:
    out = packaging_root / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-w", str(out), str(source_copy)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    (path,) = out.glob("cnn_jax-*.whl")
    return path


@pytest.fixture(scope="session")
def editable_wheel(packaging_root, source_copy) -> Path:
    """setuptools' editable wheel of the source copy (what `pip install -e` installs)."""
    out = packaging_root / "editable"
    out.mkdir()
    code = f"import setuptools.build_meta as b; print(b.build_editable({str(out)!r}))"
    subprocess.run(
        [sys.executable, "-c", code], cwd=source_copy, check=True, capture_output=True, text=True
    )
    (path,) = out.glob("cnn_jax-*.whl")
    return path


@pytest.fixture(scope="session")
def core_closure() -> dict[str, metadata.Distribution]:
    return requirement_closure(CORE)


@pytest.fixture(scope="session")
def config_deps(packaging_root, core_closure) -> Path:
    """The core closure plus what cnn_jax.config needs (ml_collections and its requirements)."""
    return expose({**core_closure, **requirement_closure(("ml_collections",))},
                  packaging_root / "config_deps")  # fmt: skip


@pytest.fixture(scope="session")
def core_venv(packaging_root, core_closure, wheel) -> Path:
    deps = expose(core_closure, packaging_root / "core_deps")
    python = make_venv(packaging_root / "core_venv", deps)
    pip_install(python, wheel)
    return python


@pytest.fixture(scope="session")
def config_venv(packaging_root, config_deps, wheel) -> Path:
    python = make_venv(packaging_root / "config_venv", config_deps)
    pip_install(python, wheel)
    return python


@pytest.fixture(scope="session")
def editable_venv(packaging_root, config_deps, editable_wheel) -> Path:
    python = make_venv(packaging_root / "editable_venv", config_deps)
    pip_install(python, editable_wheel)
    return python


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory outside the checkout and the source copy."""
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


def repo_experiments() -> tuple[list[str], list[str]]:
    """(config experiments, script experiments) of the checkout's experiments/ folder."""
    configs, scripts = [], []
    for p in sorted((REPO / "experiments").glob("*.py")):
        text = p.read_text()
        if p.stem.startswith("_"):
            continue
        if "def get_config" in text:
            configs.append(p.stem)
        elif "def main(" in text:
            scripts.append(p.stem)
    return configs, scripts


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


def test_wheel_contents_and_requirements(wheel, source_copy):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta_text = zf.read(meta).decode()
    package = source_copy / "cnn_jax"
    expected = {p.relative_to(source_copy).as_posix() for p in package.rglob("*.py")}
    # package data: the explorer's page (html, js, css)
    expected |= {
        p.relative_to(source_copy).as_posix()
        for p in (package / "explore" / "static").glob("*")
        if p.is_file()
    }
    assert "cnn_jax/explore/static/index.html" in expected
    expected |= {
        "cnn_jax/experiments/" + p.name for p in (source_copy / "experiments").glob("*.py")
    }
    assert "cnn_jax/experiments/__init__.py" in expected
    assert expected <= names, f"not in the wheel: {sorted(expected - names)}"
    assert not [n for n in names if n.startswith("experiments/")]  # no top-level package
    core, by_extra = set(), {}
    for line in meta_text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            extra = re.search(r'extra == "([^"]+)"', str(req.marker or ""))
            if extra:
                by_extra.setdefault(extra.group(1), set()).add(canonicalize_name(req.name))
            else:
                core.add(canonicalize_name(req.name))
    assert core == {canonicalize_name(n) for n in CORE}
    full = {"tensorflow-datasets", "tensorflow-cpu", "ml-collections", "orbax-checkpoint",
            "scikit-learn", "pillow", "matplotlib", "tqdm", "tensorboardx"}  # fmt: skip
    assert full <= by_extra["full"]
    assert by_extra["bench"] == {"torch"}
    assert {"pytest", "ruff"} <= by_extra["dev"]


def test_core_closure_excludes_the_full_extra(core_closure):
    assert {canonicalize_name(n) for n in CORE} <= set(core_closure)
    full = {"tensorflow", "tensorflow-cpu", "tensorflow-datasets", "ml-collections",
            "matplotlib", "scikit-learn", "pillow", "tqdm", "tensorboardx"}  # fmt: skip
    assert not full & set(core_closure)


CORE_SCRIPT = """
import importlib.util, json, sys
missing = {m: importlib.util.find_spec(m) is None for m in ("tensorflow", "ml_collections")}
import cnn_jax, cnn_jax.errors, cnn_jax.ops, cnn_jax.filters, cnn_jax.layers, cnn_jax.models
import cnn_jax.train, cnn_jax.train.steps, cnn_jax.train.state
import jax, jax.numpy as jnp, optax
from cnn_jax.models import get_model
from cnn_jax.train.state import create_train_state
from cnn_jax.train.steps import cross_entropy, make_train_step

model = get_model("lenet5", num_classes=10)
tx = optax.sgd(0.1)
state = create_train_state(model, tx, (28, 28, 1), jax.random.PRNGKey(0))
images = jax.random.normal(jax.random.PRNGKey(1), (4, 28, 28, 1))
batch = {"image": images, "label": jnp.arange(4, dtype=jnp.int32)}
new_state, metrics = jax.jit(make_train_step(model, tx))(state, batch)

def loss(params):
    logits = model.apply({"params": params}, images, train=False)
    return cross_entropy(logits, batch["label"]).mean()

grads = jax.grad(loss)(state.params)
grad_norm = float(optax.global_norm(grads))
differs = lambda a, b: bool((a != b).any())
changed = jax.tree.leaves(jax.tree.map(differs, state.params, new_state.params))
print(json.dumps({
    "missing": missing,
    "cnn_jax_file": cnn_jax.__file__,
    "step": int(new_state.step),
    "loss": float(metrics["loss"]),
    "grad_norm": grad_norm,
    "all_params_changed": all(changed),
    "full_modules_loaded": sorted(m for m in %r if m in sys.modules),
}))
"""


def test_core_install_builds_and_trains_a_model(core_venv, elsewhere):
    """jax, jaxlib, flax, optax, numpy (and their requirements) only: the library's ops,
    layers, model zoo and pure train step work, and nothing of the full extra is there."""
    result = run_in(core_venv, CORE_SCRIPT % (FULL_MODULES,), elsewhere)
    assert result["missing"] == {"tensorflow": True, "ml_collections": True}
    assert str(core_venv.parent.parent) in result["cnn_jax_file"]  # the wheel, not the checkout
    assert result["step"] == 1 and 0 < result["loss"] < 10
    assert 0 < result["grad_norm"] < float("inf") and result["all_params_changed"]
    assert result["full_modules_loaded"] == []


def test_core_install_cli_names_the_missing_extra(core_venv, elsewhere):
    cnn_jax_script = core_venv.parent / "cnn-jax"
    done = run_command([cnn_jax_script, "train", "lenet5_digits"], elsewhere)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    match = EXTRA_MESSAGE.match(done.stderr.strip())
    assert match and match.group(1) in FULL_MODULES, done.stderr
    helped = run_command([cnn_jax_script, "--help"], elsewhere)
    assert helped.returncode == 0 and "train" in helped.stdout, helped.stderr


EXPERIMENTS_SCRIPT = """
import importlib.util, json, sys
from cnn_jax import cli, config
spec = importlib.util.find_spec("cnn_jax.experiments")
c = config.validate_config(config.load_config("lenet5_digits"))
print(json.dumps({
    "cnn_jax_file": config.__file__,
    "package_locations": list(spec.submodule_search_locations) if spec else None,
    "experiments_dir": str(config.experiments_dir()),
    "available": config.available_experiments(),
    "scripts": sorted(cli._scripts()),
    "lenet5_digits": [c.experiment, c.model.name, c.dataset.name, c.is_locked],
}))
"""


def test_named_experiments_after_wheel_install(config_venv, elsewhere):
    """A non-editable install run from another directory finds the shipped experiments."""
    result = run_in(config_venv, EXPERIMENTS_SCRIPT, elsewhere)
    site = str(config_venv.parent.parent)
    assert result["cnn_jax_file"].startswith(site)
    (location,) = result["package_locations"]
    assert location.startswith(site) and location.endswith("cnn_jax/experiments")
    assert result["experiments_dir"] == location
    configs, scripts = repo_experiments()
    assert result["available"] == configs and "lenet5_digits" in configs
    assert result["scripts"] == scripts
    assert result["lenet5_digits"] == ["lenet5_digits", "lenet5", "digits", True]


def test_named_experiments_after_editable_install(editable_venv, source_copy, elsewhere):
    """`pip install -e`: setuptools' editable finder maps cnn_jax.experiments to experiments/."""
    result = run_in(editable_venv, EXPERIMENTS_SCRIPT, elsewhere)
    assert result["cnn_jax_file"] == str(source_copy / "cnn_jax" / "config.py")
    assert result["package_locations"] == [str(source_copy / "experiments")]
    assert result["experiments_dir"] == str(source_copy / "experiments")
    configs, scripts = repo_experiments()
    assert result["available"] == configs and result["scripts"] == scripts
    assert result["lenet5_digits"] == ["lenet5_digits", "lenet5", "digits", True]


# ----------------------------------------------------------------------------------------------
# In this venv: the CLI's message for a missing extra, and script experiments
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["tensorflow_datasets", "orbax.checkpoint", "PIL.Image"])
def test_cli_missing_extra_message(capsys, monkeypatch, module):
    def needs(args):
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)

    monkeypatch.setattr(cli, "cmd_summary", needs)
    assert cli.main(["summary", "lenet5"]) == 2
    out, err = capsys.readouterr()
    top = module.split(".")[0]
    assert err == (
        f"cnn-jax: error: this command needs {top} from the 'full' extra: "
        "pip install 'cnn_jax[full]'\n"
    )
    assert EXTRA_MESSAGE.match(err.strip()) and out == ""


def test_cli_other_missing_module_is_not_hidden(monkeypatch):
    def needs(args):
        raise ModuleNotFoundError("No module named 'nonexistent_thing'", name="nonexistent_thing")

    monkeypatch.setattr(cli, "cmd_summary", needs)
    with pytest.raises(ModuleNotFoundError, match="nonexistent_thing"):
        cli.main(["summary", "lenet5"])


def test_scripts_come_from_the_experiments_package():
    from cnn_jax.config import experiments_dir

    _, scripts = repo_experiments()
    found = cli._scripts()
    assert sorted(found) == scripts
    assert all(path.parent == experiments_dir() for path in found.values())
