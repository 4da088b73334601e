"""What `rlhf-cluster submit` sends to a cluster: a staged working directory holding the code, the
validated config and the user's own modules. (The job commands and the Ray Jobs client: `jobs.py`.)"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import typer
import yaml

from actors.commands.common import REPO
from rlhf_cluster.config import FunctionReward, JobConfig


def stage_working_dir(cfg: JobConfig, py_modules: list[Path], working_dir: Path | None) -> Path:
    """A working dir holding the code, the validated config, the user's `working_dir` contents
    and modules (those named and the user code's own: `user_modules`): what the job runs with. The
    working dir is on the path of the driver and of every actor, so the modules import there."""
    stage = Path(tempfile.mkdtemp(prefix="rlhf-job-"))
    try:
        if working_dir is not None:
            if not working_dir.is_dir():
                raise typer.BadParameter(f"--working-dir {working_dir}: not a directory")
            shutil.copytree(
                working_dir, stage, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", ".git")
            )
        for module in [*py_modules, *user_modules(cfg)]:
            if not module.exists():
                raise typer.BadParameter(f"--py-modules {module}: no such file or package directory")
            if module.is_dir():
                shutil.copytree(
                    module, stage / module.name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(module, stage / module.name)
        for package in ("rlhf_cluster", "actors"):
            shutil.copytree(REPO / package, stage / package, ignore=shutil.ignore_patterns("__pycache__"))
        (stage / "job.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage


def user_code(cfg: JobConfig) -> list[tuple[str, str]]:
    """What the config names by `module:attribute`, as (what, spec): the reward functions
    (`scoring.rewards`), the policy loss (`algorithm.loss.function`), dynamic sampling's filter
    (`algorithm.shaping.group_filter`), an environment class
    (`generation.environment`, not a built-in's name) and an agent (`generation.agent.function`)."""
    found = [("reward", source.function) for source in cfg.scoring.rewards if isinstance(source, FunctionReward)]
    g = cfg.generation
    named = [
        ("policy loss", cfg.algorithm.loss.function),
        ("group filter", cfg.algorithm.shaping.group_filter),
        ("environment", g.environment if g.environment and ":" in g.environment else None),
        ("agent", g.agent.function if g.agent is not None else None),
    ]
    return found + [(what, spec) for what, spec in named if spec is not None]


def user_modules(cfg: JobConfig) -> list[Path]:
    """The local files of the config's user code (`user_code`: a user's `my_rewards.py`,
    `my_losses.py`) that live outside this project and outside installed packages: the cluster
    has no other way to import them. Each once, in the config's order."""
    import importlib.util
    import sysconfig

    installed = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # `module:function` names a module importable from here
    found: list[Path] = []
    for what, function in user_code(cfg):
        top = function.split(":")[0].split(".")[0]
        spec = importlib.util.find_spec(top)
        if spec is None or spec.origin in (None, "built-in", "frozen"):
            continue
        origin = Path(spec.origin).resolve()
        path = origin.parent if origin.name == "__init__.py" else origin
        if (
            path in found
            or path.is_relative_to(REPO / "rlhf_cluster")
            or path.is_relative_to(REPO / "actors")
            or any(path.is_relative_to(root) for root in installed)
            or path.is_relative_to(Path(sys.base_prefix))
        ):
            continue
        typer.echo(f"shipping {what} module {top} ({path})", err=True)
        found.append(path)
    return found
