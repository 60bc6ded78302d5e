"""Which model versions each deployment uses (the rest of deployments comes with the fleet)."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cloud.store.errors import NotFoundError
from cloud.store.models import Deployment, DeploymentModel, Model, ModelVersion


def set_deployment_models(session: Session, deployment: str, models: Iterable[tuple[str, int]]) -> None:
    """Record that ``deployment`` uses exactly these ``(model name, version)`` pairs.

    Creates the deployment row when missing; raises NotFoundError for a version that does not exist.
    """
    ids = []
    for name, version in models:
        version_id = session.scalar(
            select(ModelVersion.id).join(Model).where(Model.name == name, ModelVersion.version == version)
        )
        if version_id is None:
            raise NotFoundError(
                f"deployment {deployment!r} uses model {name}:{version}, which is not registered"
            )
        ids.append(version_id)
    if session.get(Deployment, deployment) is None:
        session.add(Deployment(name=deployment))
        session.flush()
    session.execute(delete(DeploymentModel).where(DeploymentModel.deployment_name == deployment))
    session.add_all(DeploymentModel(deployment_name=deployment, model_version_id=i) for i in sorted(set(ids)))
    session.flush()


def deployments_using(session: Session, version_ids: Iterable[int]) -> dict[int, list[str]]:
    """Deployment names using each of these model version ids (only ids in use appear)."""
    wanted = list(version_ids)
    if not wanted:
        return {}
    rows = session.execute(
        select(DeploymentModel.model_version_id, DeploymentModel.deployment_name)
        .where(DeploymentModel.model_version_id.in_(wanted))
        .order_by(DeploymentModel.deployment_name)
    )
    users: dict[int, list[str]] = {}
    for version_id, deployment in rows:
        users.setdefault(version_id, []).append(deployment)
    return users
