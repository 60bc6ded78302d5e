"""Train the diabetes Ridge regression and write an entry-script module folder."""

from __future__ import annotations

import shutil
from pathlib import Path

from modules.contract import ModelRef, ModuleInfo
from modules.examples._files import write_json, write_module_info

SEED = 0
SCRIPTS = ("score.py", "score_schema.py")


def build_diabetes_model(out_dir: str | Path, entry_script: str = "score.py") -> Path:
    """Train on ``load_diabetes`` and write the module into ``out_dir``; return the ``model.pkl`` path.

    Written: ``model.pkl`` (joblib), both entry scripts, ``sample.json`` (one held-out row as
    ``{"data": [[10 floats]]}``), ``expected.json`` (its true ``target`` and the model's
    ``prediction``) and ``module.json`` naming ``entry_script`` (``score.py`` or ``score_schema.py``).
    """
    if entry_script not in SCRIPTS:
        raise ValueError(f"entry_script must be one of {', '.join(SCRIPTS)}, got {entry_script!r}")
    import joblib
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import train_test_split

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    data = load_diabetes()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.25, random_state=SEED
    )
    model = Ridge(alpha=0.1).fit(x_train, y_train)
    model_path = out / "model.pkl"
    joblib.dump(model, model_path)

    here = Path(__file__).parent
    for script in SCRIPTS:
        shutil.copyfile(here / script, out / script)

    row = [float(v) for v in x_test[0]]
    sample = {"data": [row]}
    prediction = float(model.predict(x_test[:1])[0])
    write_json(out / "sample.json", sample)
    write_json(out / "expected.json", {"target": float(y_test[0]), "prediction": prediction})
    write_module_info(
        out,
        ModuleInfo(
            name="diabetes",
            version="1",
            profile="cpu",
            models=[ModelRef(name="diabetes", version=1, files=["model.pkl"])],
            entry_script=entry_script,
            input_sample=sample,
            output_sample=[prediction],
        ),
    )
    return model_path
