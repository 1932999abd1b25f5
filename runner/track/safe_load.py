"""Files someone else may have written (a model folder, a checkpoint) read without running code from them.

Unpickling runs whatever code the bytes name, and MLflow 3.17 unpickles by default (its
MLFLOW_ALLOW_PICKLE_DESERIALIZATION is true unless set). The runner's own models need no
pickle: the torch model is a torch.export program (``data/model.pt2``), the Keras model a
``.keras`` file that Keras reads in its safe mode. So a model folder is judged by its MLmodel
(plain YAML) and file names before any MLflow loader runs, and then loaded with MLflow's
variable false, which makes MLflow check the records of the .pt2 archive as well; a model that
would unpickle, or import code it ships, loads only when the user opts in (:data:`OPT_IN`).
Checkpoints are read by their trainer with ``torch.load(weights_only=True)`` or
``keras.saving.load_model(safe_mode=True)``; one that cannot be is an :class:`UnreadableCheckpoint`,
and a resume reads them all (:func:`check_resume`) before the interrupted run reopens (a Keras
run then restores the checked one as arrays into its own model).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from runner.errors import ConfigError

PICKLE_VARIABLE = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"  # MLflow's own switch, read by its loaders at load time
OPT_IN = f"--allow-pickle (or {PICKLE_VARIABLE}=true)"
KERAS_MODULES = ("keras", "tensorflow.keras")  # what MLflow may import for a Keras model (data/keras_module.txt)


def pickle_opted_in(flag: bool) -> bool:
    """The user's choice to unpickle: ``flag`` (--allow-pickle), or MLflow's variable set to true (unset is no choice, whatever MLflow's default)."""
    return flag or os.environ.get(PICKLE_VARIABLE, "").strip().lower() in ("true", "1")


def _flavors(folder: Path) -> Mapping[str, Any]:
    """The ``flavors`` of the folder's MLmodel, parsed as plain YAML (no tags, no objects)."""
    try:
        mlmodel = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"{folder} is not an MLflow model folder: its MLmodel cannot be read ({err}).") from None
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, Mapping) else None
    if not isinstance(flavors, Mapping):
        raise ConfigError(f"{folder} is not an MLflow model folder: its MLmodel names no flavors.")
    return flavors


def pickle_reason(folder: Path) -> str | None:
    """What ``mlflow.pyfunc.load_model(folder)`` would unpickle or import from the folder; None: nothing.

    Only the two formats the runner logs pass: mlflow.pytorch's .pt2 program and
    mlflow.tensorflow's .keras model; any other loader (a cloudpickle'd python_model, a
    pickled scikit-learn model, ...) is named as the reason.
    """
    flavors = _flavors(folder)
    pyfunc = flavors.get("python_function")
    if not isinstance(pyfunc, Mapping):
        return None  # MLflow refuses a model without a python_function flavor before it loads anything
    shipped = sorted(name for name, flavor in flavors.items() if isinstance(flavor, Mapping) and flavor.get("code"))
    if shipped:
        return f"its {shipped[0]} flavor puts the folder's Python code ({flavors[shipped[0]]['code']}) on the import path"
    data = (folder / str(pyfunc.get("data", ""))).resolve()
    if not data.is_relative_to(folder.resolve()):
        return f"its python_function data ({pyfunc.get('data')}) lies outside the model folder"
    loader = pyfunc.get("loader_module")
    if loader == "mlflow.pytorch":
        return _torch_reason(folder, data)
    if loader == "mlflow.tensorflow":
        return _keras_reason(folder, data)
    if loader == "mlflow.pyfunc.model" and "model_code_path" in pyfunc:
        return f"its python_function flavor runs the Python file it ships ({pyfunc['model_code_path']})"
    if loader == "mlflow.pyfunc.model":
        return f"its python_function flavor is a python_model that MLflow unpickles with cloudpickle ({pyfunc.get('python_model')})"
    return f"its python_function flavor loads through {loader}, which may unpickle (only .pt2 torch and .keras models load without pickle)"


def _torch_reason(folder: Path, data: Path) -> str | None:
    """A pickled torch model (``data/model.pth``, or ``data`` itself a file): MLflow's .pt2 checks pass the rest."""
    pickled = data if data.is_file() else data / "model.pth"
    if pickled.exists():
        return f"its pytorch flavor is pickled: {pickled.relative_to(folder.resolve())} (mlflow.pytorch serialization_format='pickle')"
    return None


def _keras_reason(folder: Path, data: Path) -> str | None:
    """Custom objects that MLflow cloudpickled, a module to import, or a format Keras' safe mode does not cover."""
    root = folder.resolve()
    pickled = sorted(data.glob("*.cloudpickle"))
    if pickled:
        return f"its tensorflow flavor holds Keras custom objects pickled with cloudpickle: {pickled[0].relative_to(root)}"
    module_file = data / "keras_module.txt"
    module = module_file.read_text(errors="replace").strip() if module_file.is_file() else KERAS_MODULES[1]
    if module not in KERAS_MODULES:
        return f"its tensorflow flavor names the module {module!r} for MLflow to import ({module_file.relative_to(root)})"
    format_file = data / "save_format.txt"
    saved_as = format_file.read_text(errors="replace").strip() if format_file.is_file() else "h5"  # MLflow's default, as it loads
    if saved_as == "h5" or not (data / "model.keras").is_file():
        return f"its tensorflow flavor is not a .keras model (save format {saved_as}): only that format loads in Keras' safe mode"
    return None


@contextmanager
def _pickle_setting(allowed: bool) -> Iterator[None]:
    """MLflow's own pickle switch set to ``allowed`` for the block, and put back after it."""
    saved = os.environ.get(PICKLE_VARIABLE)
    os.environ[PICKLE_VARIABLE] = "true" if allowed else "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(PICKLE_VARIABLE, None)
        else:
            os.environ[PICKLE_VARIABLE] = saved


def load_model(uri: str, allow_pickle: bool = False) -> Any:
    """``mlflow.pyfunc.load_model`` of ``uri`` that unpickles nothing unless the user opted in (:func:`pickle_opted_in`).

    The model is fetched (a local folder is used in place), judged by :func:`pickle_reason`,
    and only then loaded, from the very files judged.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    allowed = pickle_opted_in(allow_pickle)
    refusal = (
        f"Load it only if you trust where it came from: pass {OPT_IN}. A model logged by this runner needs neither."
    )
    if not allowed and (reason := pickle_reason(folder)) is not None:
        raise ConfigError(f"refusing to load the model {uri!r}: {reason}, and loading that runs whatever code its author put in it. {refusal}")
    with _pickle_setting(allowed):
        try:
            return mlflow.pyfunc.load_model(str(folder))
        except MlflowException as err:  # MLflow's own checks (e.g. a .pt2 archive with pickled records)
            if allowed or "pickle" not in str(err).lower():
                raise
            said = str(err).strip().splitlines()[0]
            raise ConfigError(f"refusing to load the model {uri!r}: MLflow found pickled data in it ({said}). {refusal}") from None


class UnreadableCheckpoint(ConfigError):
    """A checkpoint that is truncated, damaged, or holds more than weights and plain values (code that reading it would run)."""

    def __init__(self, path: Path, detail: str | BaseException) -> None:
        self.path = Path(path)
        if isinstance(detail, BaseException):
            said = str(detail).strip().splitlines()[0] if str(detail).strip() else "no message"
            detail = f"{type(detail).__name__}: {said[:300]}"
        self.detail = detail
        super().__init__(
            f"the checkpoint {self.path} cannot be read safely: it is truncated, damaged or holds more than weights "
            f"({detail}). Start the run anew."
        )


def check_resume(folder: Path, run_id: str, trainer: Any) -> None:
    """Read every checkpoint downloaded into ``folder`` for ``resume=<run_id>`` as ``trainer`` (runner.train.trainer.Trainer) will, before the run reopens.

    A truncated or hostile file stops the command here with one ConfigError naming it and the
    fix, and the interrupted run stays KILLED (a failure inside the reopened run would mark it FAILED).
    """
    last, suffix = trainer.CHECKPOINT, Path(trainer.CHECKPOINT).suffix
    paths = sorted((p for p in folder.glob(f"*{suffix}") if not p.name.startswith(".")), key=lambda p: (p.name != last, p.name))
    unreadable: dict[str, UnreadableCheckpoint] = {}
    for path in paths:
        try:
            trainer.read_checkpoint(path)
        except UnreadableCheckpoint as err:
            unreadable[path.name] = err
    if not unreadable:
        return
    name, err = next(iter(unreadable.items()))  # the last checkpoint's first: it is the one a resume starts from
    anew = "start anew (the same command without resume=...)"
    best = f"best{suffix}"
    if name != last:
        fix = f"Remove checkpoints/{name} from the run's artifacts to resume from checkpoints/{last} (the model may then be the last epoch's), or {anew}."
    elif (folder / best).exists() and best not in unreadable:
        fix = f"Resume from the best checkpoint (copy the run's checkpoints/{best} over its checkpoints/{last} in its artifacts, then run this command again), or {anew}."
    else:
        fix = f"The run has no other readable checkpoint: {anew}."
    raise ConfigError(
        f"resume={run_id}: the checkpoint checkpoints/{name} of that run ({err.path}) cannot be read safely: "
        f"it is truncated, damaged or holds more than weights ({err.detail}). {fix}"
    )
