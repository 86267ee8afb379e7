"""Promotions sent at once (two managers, or the API and the page) leave exactly one active version."""

import threading

import pytest
from django.db import connection

from feedback.models import ModelVersion
from feedback.services.model_versions import model_version_promote
from tests.factories import ModelVersionFactory, ProjectFactory

pytestmark = pytest.mark.django_db(transaction=True)


def test_promotions_at_once_leave_one_active_version_and_raise_nothing():
    project = ProjectFactory()
    versions = [ModelVersionFactory(project=project, name=f"v{n}") for n in range(4)]
    errors: list[BaseException] = []
    for _ in range(5):
        barrier = threading.Barrier(len(versions))

        def promote(version: ModelVersion, barrier: threading.Barrier) -> None:
            try:
                barrier.wait()
                model_version_promote(version=version, generate=False)
            except BaseException as error:  # reported below
                errors.append(error)
            finally:
                connection.close()

        threads = [threading.Thread(target=promote, args=(v, barrier)) for v in versions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        assert ModelVersion.objects.filter(project=project, is_active=True).count() == 1
